"""Evaluation: top-1/top-5 and loss over the validation split, every image counted once over the
ranks, for the model and for its EMA."""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data.loaders import normalize
from .distributed import multi_rank


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, input_dtype, desc: str, show: bool, channels_last=False) -> dict:
    """top-1/top-5 over this rank's shard, summed over ranks: every val image counts once.
    The model's train/eval mode is restored, so evaluating one model never changes another."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True):
        targets = targets.to(device)
        logits = model(normalize(images, device, input_dtype, channels_last)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                               F.cross_entropy(logits, targets, reduction="sum"),
                               torch.tensor(len(targets), device=device)]).double()
    model.train(was_training)
    if multi_rank():
        torch.distributed.all_reduce(totals)
    correct1, correct5, loss_sum, count = totals.tolist()
    return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "loss": loss_sum / count,
            "images": int(count)}


def evaluate_model_and_ema(engine, ema_module: nn.Module, loader, show: bool, channels_last=False) -> dict:
    """The model as DeepSpeed runs it (in its precision), then the fp32 EMA; and how long the EMA took."""
    model = evaluate(engine.ds, loader, engine.device, engine.input_dtype, "eval model", show, channels_last)
    started = time.time()
    averaged = evaluate(ema_module, loader, engine.device, torch.float32, "eval EMA", show, channels_last)
    return {"ema_eval_seconds": time.time() - started, "top1": model["top1"], "top5": model["top5"],
            "val_loss": model["loss"], "ema_top1": averaged["top1"], "ema_top5": averaged["top5"],
            "ema_val_loss": averaged["loss"], "val_images": model["images"]}
