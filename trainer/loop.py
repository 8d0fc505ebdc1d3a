"""The training run, read top to bottom: `fit` builds everything and runs the
epochs, `train_step` is one micro batch, `evaluate` is one pass over val.

    python -m trainer train --recipe demo
"""
from __future__ import annotations

import math
from itertools import islice
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, health, precision
from .config import Config, ConfigError, save_config
from .data import build_loaders, normalize
from .compiled import EmaEvalCompile, RecompileWatch, compile_engine, compile_model
from .engine import build_ds_config, build_ema, build_engine, init_distributed
from .loss import build_loss
from .mixup import build_batch_augment
from .model import build_model
from .optim import LRSchedule, build_l2_penalty, build_optimizer, peak_lr, set_lr
from .rundir import claim_run_dir
from .health import HealthMonitor, StepRecord, all_finite
from .track import Tracker

METRIC_NAMES = ("top1", "top5", "ema_top1", "ema_top5")


@dataclass
class TrainState:
    """The trainer's own position; checkpointed with the weights."""
    step: int = 0  # optimizer steps taken: the lr schedule's clock
    epoch: int = 0
    batches_in_epoch: int = 0  # micro batches of `epoch` already consumed
    images_seen: int = 0  # global, all ranks
    skipped_steps: int = 0  # optimizer steps skipped for overflow / non-finite gradients
    train_seconds: float = 0.0  # wall time spent in training steps, all sessions
    # micro-batch losses since the last logged row: a resumed run's first row averages the same window
    loss_window_sum: float = 0.0
    loss_window_count: int = 0
    last_eval: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    corrupt_images: list[int] = field(default_factory=list)  # source indices found not to decode, all ranks


class Collapsed(Exception):
    """The run cannot go on: its steps are all being skipped, or its weights are non-finite."""


def prepare_batch(images, targets, device, input_dtype, batch_aug=None, position=(0, 0), channels_last=False):
    """uint8 images -> normalized model inputs. Erasing and mixup work on the normalized fp32
    batch, keyed by (epoch, micro batch in epoch) so a replay or a resume draws the same numbers."""
    inputs = normalize(images, device, channels_last=channels_last)
    targets = targets.to(device)
    if batch_aug is not None:  # random erasing, then mixup/cutmix (targets become probabilities)
        inputs, targets = batch_aug(inputs, targets, *position)
    return inputs.to(input_dtype), targets


def train_step(engine, inputs, targets, criterion, l2_penalty=None) -> torch.Tensor:
    """One micro batch. DeepSpeed owns loss scaling, accumulation and clipping:
    engine.step() applies the optimizer only at an accumulation boundary."""
    logits = engine(inputs)
    loss = criterion(logits, targets)  # the loss picks its own precision (log_softmax in fp32)
    # optim.wd_form=l2_loss: TF's weight-decay term joins the loss; the returned (logged) loss excludes it
    precision.backward(engine, loss if l2_penalty is None else loss + l2_penalty())
    try:
        engine.step()
    except Exception as err:  # ZeRO 1/2's loss scaler raises instead of going below its minimum
        if "loss scale already at minimum" in str(err):
            raise Collapsed("fp16 loss scale reached DeepSpeed's minimum and the step still overflowed") from err
        raise
    return loss.detach()


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
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    correct1, correct5, loss_sum, count = totals.tolist()
    return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "loss": loss_sum / count,
            "images": int(count)}


def evaluate_both(engine, ema, loader, input_dtype, show: bool, channels_last=False) -> dict:
    model = evaluate(engine, loader, engine.device, input_dtype, "eval model", show, channels_last)
    started = time.time()
    averaged = evaluate(ema.module, loader, engine.device, torch.float32, "eval EMA", show, channels_last)
    return {"ema_eval_seconds": time.time() - started, "top1": model["top1"], "top5": model["top5"], "val_loss": model["loss"],
            "ema_top1": averaged["top1"], "ema_top5": averaged["top5"], "ema_val_loss": averaged["loss"],
            "val_images": model["images"]}


class StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop at the next step boundary.

    Each rank receives its signal at its own moment (the launcher and SLURM signal them one by
    one), so the loop acts only on `signal`, which `agree` sets on every rank at the same step:
    a rank that stopped alone would checkpoint by itself while the others waited in their next
    collective until the timeout."""

    def __init__(self, group=None):
        self.signal = None  # agreed by all ranks: the loop stops on this one
        self.received = None  # this rank's own signal, not yet agreed
        self.group = group  # a gloo group: the agreement is a host-side all_reduce, no device sync
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def agree(self) -> None:
        """Every rank calls this at every step boundary: a signal on any rank stops them all."""
        if self.signal is not None:  # already agreed, or --stop-at-step (the same step on every rank)
            return
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([self.received is not None], dtype=torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
            if flag.item():
                self.signal = self.received or "a signal to another rank"
        else:
            self.signal = self.received


def mean_over_ranks(value: torch.Tensor) -> float:
    """A per-rank scalar averaged over the ranks (all must call it): the logged loss is the global
    batch's, the loss one process with the global batch would log."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        value = value.detach().clone()
        torch.distributed.all_reduce(value)  # SUM: gloo has no AVG
        value /= torch.distributed.get_world_size()
    return value.item()


def corrupt_images_over_ranks(loaders, group) -> list[int]:
    """The images found corrupt so far on any rank (source indices), now flagged on this rank too:
    the metric counts each file once over all ranks, and a rank does not report a file another
    rank met in an earlier epoch. A collective: every rank calls it at the same step."""
    found = loaders.corrupt_indices()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, sorted(found), group=group)  # a few ints per rank
        found = set().union(*every)
        loaders.mark_corrupt(found)
    return sorted(found)


def fit(cfg: Config, run_dir: Path | None, resume: str | None, stop_at_step: int | None = None) -> dict:
    """resume: None (fresh run), "auto" (continue if a checkpoint exists) or "required".
    stop_at_step: behave as if interrupted right after that optimizer step."""
    dist = init_distributed(cfg.train.collective_timeout_s)
    t = cfg.train
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DeepSpeed also broadcasts rank 0's)

    # -- build: everything that can reject the config happens before the run directory exists
    loaders = build_loaders(cfg.data, t.micro_batch, cfg.seed, dist.rank, dist.world_size)
    batch_aug = build_batch_augment(cfg.data, cfg.mixup, loaders.num_classes, t.micro_batch, cfg.seed, dist.rank)
    steps_per_epoch = len(loaders.train) // t.grad_accum
    global_batch = dist.world_size * t.micro_batch * t.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"data: {loaders.train_size} training images are fewer than one global batch "
                          f"({global_batch}); lower train.micro_batch")
    schedule_epoch = steps_per_epoch * t.epoch_scale  # optimizer steps in one epoch of the recipe's lengths
    total_steps = min(t.max_steps or math.inf, math.ceil(t.epochs * schedule_epoch))
    ds_config = build_ds_config(t, dist.world_size)
    precision.check_precision_supported(t.precision, t.allow_cpu_fp16)
    model = build_model(cfg.model, loaders.num_classes)
    run_dir, run_lock = claim_run_dir(cfg, run_dir, resume, dist)  # rank 0 owns run_dir until release()

    from deepspeed.accelerator import get_accelerator
    device = torch.device(get_accelerator().device_name(dist.local_rank))
    model.to(device)
    ema = build_ema(model, t, device)  # a separate fp32 copy, before DeepSpeed casts or wraps the model
    schedule = LRSchedule(cfg.schedule, peak_lr(cfg.optim, global_batch), schedule_epoch, total_steps)
    optimizer = build_optimizer(cfg.optim, model, lr=schedule(0))
    compile_model(model, t)
    engine, guard = build_engine(model, optimizer, ds_config, t)
    compile_engine(engine, t)
    l2_penalty = build_l2_penalty(cfg.optim, engine.module)  # after the engine: the tensors it trains
    input_dtype = next(engine.module.parameters()).dtype  # half when DeepSpeed's fp16 casts the model
    criterion = build_loss(cfg.loss)

    ckpt_dir = run_dir / "checkpoints"
    state = TrainState()
    found = checkpoint.load_newest_intact(engine, ckpt_dir) if resume else None  # verified; skips a damaged one
    if found is not None:
        tag, client = found
        state = TrainState(**client["trainer"])
        loaders.mark_corrupt(state.corrupt_images)  # counted on, not reported again
        ema.load_state_dict(client["ema"])
        checkpoint.restore_rng_states(client["rng"])
        if dist.is_main:
            print(f"resuming from {ckpt_dir / tag} (step {state.step})", flush=True)
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
    tracker = Tracker(run_dir, cfg.to_dict(), cfg.wandb, cfg.name, enabled=dist.is_main, resume_step=state.step)
    monitor = HealthMonitor(ds_config["fp16"].get("min_loss_scale", 1) if t.precision == "fp16" else None,
                            t.max_consecutive_skips, skipped_steps=state.skipped_steps)

    def save_checkpoint(new_best: bool = False):
        if not all_finite(engine.module):  # never write a checkpoint that cannot be trained from
            raise Collapsed("the weights are non-finite; the last good checkpoint is kept")
        state.skipped_steps = monitor.skipped_steps
        state.loss_window_sum, state.loss_window_count = float(loss_sum), loss_count  # a device sync
        state.corrupt_images = corrupt_images_over_ranks(loaders, dist.cpu_group)
        client = {"trainer": asdict(state), "ema": ema.state_dict(), "rng": checkpoint.rng_states(),
                  "config": cfg.to_dict()}
        best = {"metric": t.keep_best, "value": state.best[t.keep_best]} if new_best else None
        checkpoint.save(engine, ckpt_dir, state.step, client, t.keep_checkpoints, dist.is_main, best=best)

    def summary(status: str) -> dict:
        state.skipped_steps = monitor.skipped_steps
        # every rank ends a completed or interrupted run at the same step; after a failure, this rank's view
        agreed = status in ("completed", "interrupted")
        corrupt = corrupt_images_over_ranks(loaders, dist.cpu_group) if agreed else loaders.corrupt_indices()
        return {"status": status, "skipped_steps": state.skipped_steps, "corrupt_images": len(corrupt),
                "run_dir": str(run_dir), "steps": state.step, "total_steps": total_steps,
                "epochs": state.step / steps_per_epoch, "images_seen": state.images_seen,
                "images_per_s": state.images_seen / max(state.train_seconds, 1e-9),
                "wall_time_s": time.time() - started, "final": state.last_eval, "best": state.best,
                "first_step_s": first_step_s, "compiled_graphs": compiles.graphs(),
                "recompiles": compiles.recompiles(),
                **{k: state.last_eval.get(k) for k in METRIC_NAMES},
                **{f"best_{k}": state.best.get(k) for k in METRIC_NAMES}}

    def run_eval() -> bool:
        """Evaluate and log; True when train.keep_best's metric reached a new best."""
        result = evaluate_both(engine, ema, loaders.val, input_dtype, dist.is_main, t.channels_last)
        evals_left = math.ceil((total_steps - state.step) / eval_every)
        compiled_ema = ema_eval.consider(ema.module, result.pop("ema_eval_seconds"), evals_left,
                                         first_step_s or 0.0)
        compiles.after_eval(new_graphs_expected=compiled_ema)
        state.last_eval = {"step": state.step, "epoch": state.step / steps_per_epoch, **result}
        new_best = t.keep_best != "none" and result[t.keep_best] > state.best.get(t.keep_best, -1.0)
        for key in METRIC_NAMES:
            state.best[key] = max(state.best.get(key, -1.0), result[key])
        tracker.log(state.last_eval)
        if dist.is_main:
            tqdm.write(f"eval step {state.step} epoch {state.step / steps_per_epoch:.2f}: "
                       f"model top1 {result['top1']:.2f} top5 {result['top5']:.2f} | "
                       f"EMA top1 {result['ema_top1']:.2f} top5 {result['ema_top5']:.2f} "
                       f"({result['val_images']} images)")
        return new_best

    eval_every = max(1, round(t.eval_every_epochs * steps_per_epoch))
    ckpt_every = max(1, round(t.checkpoint_every_epochs * steps_per_epoch))
    if dist.is_main:
        print(f"run {cfg.name}: {run_dir} | world {dist.world_size} x micro batch {t.micro_batch} x accum "
              f"{t.grad_accum} = global batch {global_batch} | peak lr {schedule.peak:.4g} | "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps | {cfg.model.name} {t.precision} "
              f"ZeRO {t.zero_stage} on {device}", flush=True)

    # -- train
    compiles, ema_eval = RecompileWatch(t.compile != "off"), EmaEvalCompile(t)
    first_step_s = None  # wall time of this session's first step, compiling included
    started = time.time()
    stop = StopRequest(dist.cpu_group)
    status = "failed"
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=not dist.is_main, dynamic_ncols=True)
    try:
        # a resumed run continues the logging window its checkpoint was in (exact metrics after resume)
        loss_sum, loss_count = torch.tensor(state.loss_window_sum, device=device), state.loss_window_count
        window_start, window_images = time.time(), 0
        while state.step < total_steps and stop.signal is None:
            loaders.start_epoch(state.epoch, skip_samples=state.batches_in_epoch * t.micro_batch)
            for images, targets in islice(loaders.train, steps_per_epoch * t.grad_accum - state.batches_in_epoch):
                set_lr(optimizer, schedule(state.step))
                position = (state.epoch, state.batches_in_epoch)
                inputs, soft_targets = prepare_batch(images, targets, device, input_dtype, batch_aug, position,
                                                     t.channels_last)
                scale = precision.loss_scale(engine)  # the scale this step's gradients are computed with
                loss = train_step(engine, inputs, soft_targets, criterion, l2_penalty)
                loss_sum += loss
                loss_count += 1
                state.batches_in_epoch += 1
                if state.batches_in_epoch % t.grad_accum:
                    continue  # DeepSpeed accumulates; no optimizer step yet
                # an optimizer step has been taken, or skipped for overflow / non-finite gradients
                outcome = precision.step_outcome(engine, guard, scale)
                if outcome.applied:
                    ema.update(engine.module, step=state.step)  # a skipped step never moves the EMA
                state.step += 1
                collapse = monitor.record(StepRecord(state.step, loss, outcome.applied, outcome.loss_scale,
                                                     outcome.grad_norm))
                if collapse:
                    raise Collapsed(collapse)
                state.images_seen += global_batch
                window_images += global_batch
                if first_step_s is None:  # this session's first step: it includes compiling
                    first_step_s = time.time() - window_start
                compiles.after_step()
                bar.update(1)
                if state.step == stop_at_step:
                    stop.signal = f"--stop-at-step {stop_at_step}"
                stop.agree()  # every rank stops at the same step, or none does
                if state.step % t.log_every_steps == 0 or state.step == total_steps:
                    # note: reading the loss is a device sync, done only on logging steps
                    elapsed = time.time() - window_start
                    state.train_seconds += elapsed
                    row = {"step": state.step, "epoch": state.step / steps_per_epoch,
                           "loss": mean_over_ranks(loss_sum / loss_count), "lr": schedule(state.step - 1),
                           "images_per_s": window_images / max(elapsed, 1e-9),
                           "grad_norm": None if outcome.grad_norm is None else float(outcome.grad_norm),
                           "loss_scale": precision.loss_scale(engine), "overflow": not outcome.applied,
                           "skipped_steps": monitor.skipped_steps,
                           "corrupt_images": len(corrupt_images_over_ranks(loaders, dist.cpu_group)),
                           **({"compiled_graphs": compiles.graphs(), "recompiles": compiles.recompiles()}
                              if compiles.enabled else {})}
                    compiles.check(state.step)
                    tracker.log(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}",
                                    img_s=f"{row['images_per_s']:.0f}", epoch=f"{row['epoch']:.2f}")
                    loss_sum, loss_count = torch.zeros((), device=device), 0
                    window_start, window_images = time.time(), 0
                pause = time.time()
                new_best = False
                if state.step % eval_every == 0 or state.step == total_steps:
                    new_best = run_eval()
                if state.step % ckpt_every == 0 or state.step == total_steps or stop.signal or new_best:
                    save_checkpoint(new_best)
                window_start += time.time() - pause  # eval and checkpoint time is not training time
                if state.step >= total_steps or stop.signal:
                    break
            else:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        status = "completed" if state.step >= total_steps else "interrupted"
        if status == "interrupted" and dist.is_main:
            tqdm.write(f"{stop.signal}: checkpoint written at step {state.step}; resume with --resume")
    except checkpoint.CheckpointWriteError as err:  # a full disk: the previous checkpoint is kept
        if dist.is_main:
            tqdm.write(f"error: {err}", file=sys.stderr)
    except Collapsed as collapse:
        status = "collapsed"
        if dist.is_main:  # replay the offending batch to name the first module that went non-finite
            modules = health.first_nonfinite_modules(engine.module, inputs, soft_targets, criterion, scale or 1.0)
            diagnosis = health.write_diagnosis(run_dir, str(collapse), state.step, modules, monitor, t.precision)
            culprit = diagnosis["first_nonfinite_forward"] or diagnosis["first_nonfinite_gradient"]
            tqdm.write(f"collapsed at step {state.step}: {collapse}; first non-finite: "
                       f"{culprit['module'] if culprit else 'none found'}; see {run_dir / 'diagnosis.md'}",
                       file=sys.stderr)
    finally:
        bar.close()
        result = summary(status)
        tracker.summary(result)
        tracker.finish(exit_code=0 if status in ("completed", "interrupted") else 1)
        if status != "failed" and torch.distributed.is_initialized():
            torch.distributed.barrier()  # all ranks end together
        run_lock.release()
    return result

