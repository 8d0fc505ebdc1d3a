"""Optimizer and learning-rate schedule, from the optim and schedule sections."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

from .config import OptimConfig, ScheduleConfig


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The recipe's lr is per `lr_base_batch` images; scale it by the *global* batch
    (world size x micro batch x accumulation), never the per-GPU one."""
    ratio = global_batch / cfg.lr_base_batch
    return cfg.lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.lr_scaling]


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # timm's "sgd" means Nesterov; name the variant explicitly so the setting is never implicit.
    name = {"sgd": "nesterov" if cfg.nesterov else "momentum"}.get(cfg.name, cfg.name)
    kwargs = {"momentum": cfg.momentum} if cfg.name != "adamw" else {}
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=cfg.weight_decay, **kwargs)


@dataclass(frozen=True)
class LRSchedule:
    """lr as a function of the global optimizer step.

    Our own rather than timm's schedulers: TF's staircase decay counts from step 0
    (warmup included) in fractional epochs of global steps, which timm's step
    scheduler does not reproduce."""
    cfg: ScheduleConfig
    peak: float
    steps_per_epoch: int
    total_steps: int

    def __call__(self, step: int) -> float:
        warmup_steps = round(self.cfg.warmup_epochs * self.steps_per_epoch)
        if step < warmup_steps:
            start = self.cfg.warmup_start_lr * self.peak
            return start + (self.peak - start) * step / warmup_steps
        if self.cfg.name == "constant":
            return self.peak
        if self.cfg.name == "tf_staircase":
            decay_steps = self.cfg.decay_epochs * self.steps_per_epoch
            return self.peak * self.cfg.decay_rate ** math.floor(step / decay_steps)
        # cosine from the end of warmup to the last step, reaching min_lr exactly there
        floor = self.cfg.min_lr * self.peak
        progress = (step - warmup_steps) / max(1, self.total_steps - 1 - warmup_steps)
        return floor + (self.peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
