"""One optimizer step, read top to bottom: every micro batch of the global batch forward and backward,
DeepSpeed's step, then the EMA. The loop calls it once per step; nothing else trains the model.

DeepSpeed owns accumulation (it sums the micro batches' gradients and steps at the last one),
clipping and fp16 loss scaling; the EMA moves only when the step was applied."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .data.loaders import normalize
from .engine import Collapsed, StepOutcome, TrainEngine
from .ema import Ema


@dataclass(frozen=True)
class StepParts:
    """What a training step uses, built once per run."""
    engine: TrainEngine
    ema: Ema
    criterion: nn.Module
    l2_penalty: Optional[Callable[[], torch.Tensor]]  # optim.wd_form=l2_loss: TF's weight-decay term
    batch_augment: Optional[Callable]  # random erasing, then mixup/cutmix, on the normalized batch
    channels_last: bool


@dataclass
class StepResult:
    losses: list[torch.Tensor]  # each micro batch's loss, on the device (read only on logging steps)
    outcome: StepOutcome
    last_batch: tuple  # the last micro batch's (inputs, targets): what a diagnosis replays


def prepare_batch(parts: StepParts, images: torch.Tensor, targets: torch.Tensor, position: tuple[int, int]):
    """uint8 images -> normalized model inputs. Erasing and mixup work on the normalized fp32 batch,
    keyed by (epoch, micro batch in epoch) so a replay or a resume draws the same numbers."""
    device = parts.engine.device
    inputs = normalize(images, device, channels_last=parts.channels_last)
    targets = targets.to(device)
    if parts.batch_augment is not None:  # targets become probabilities under mixup
        inputs, targets = parts.batch_augment(inputs, targets, *position)
    return inputs.to(parts.engine.input_dtype), targets


def train_step(parts: StepParts, micro_batches: list, epoch: int, first_batch: int, step: int, lr: float,
               measure_update: bool = False) -> StepResult:
    """Optimizer step number step + 1 over `micro_batches` ((uint8 images, labels) pairs), which are
    micro batches first_batch, first_batch + 1, ... of `epoch` on this rank. measure_update: the
    outcome carries the norm of the weights' change (for a step whose row is logged)."""
    engine = parts.engine
    engine.set_lr(lr)
    losses = []
    for i, (images, labels) in enumerate(micro_batches):
        inputs, targets = prepare_batch(parts, images, labels, (epoch, first_batch + i))
        loss = parts.criterion(engine(inputs), targets)  # the loss picks its own precision (log_softmax in fp32)
        # optim.wd_form=l2_loss: TF's weight-decay term joins the loss; the logged loss excludes it
        engine.backward(loss if parts.l2_penalty is None else loss + parts.l2_penalty())
        losses.append(loss.detach())
    try:
        outcome = engine.step(step + 1, measure_update)
    except Collapsed as collapse:
        collapse.batch = (inputs, targets)  # the diagnosis replays it
        raise
    if outcome.applied:
        parts.ema.update(engine.module, step=step)  # a skipped step never moves the EMA
    return StepResult(losses, outcome, (inputs, targets))
