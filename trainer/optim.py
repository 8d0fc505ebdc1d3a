"""Optimizer, weight decay and learning-rate schedule, from the optim and schedule sections.

Weight decay has two independent settings (notes part 4 compares them all):
  wd_form    how the decay acts: inside the optimizer's gradient (coupled), as a direct
             shrink of the weights each step (decoupled, decoupled_lr), or as TF's L2 loss term
  wd_params  which tensors decay; BN tensors are found by module type, never by name
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from timm.optim import RMSpropTF

from .config import ConfigError, OptimConfig, ScheduleConfig


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The recipe's lr is per `lr_base_batch` images; scale it by the *global* batch
    (world size x micro batch x accumulation), never the per-GPU one."""
    ratio = global_batch / cfg.lr_base_batch
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.lr_scaling]
    peak = cfg.lr * scale
    # a finite optim.lr can still scale to 0 (lr 0 trains nothing) or past what a float32 step can
    # hold (torch raises at the first step); any lr between trains, or collapses, which is a result
    if not 0 < peak <= torch.finfo(torch.float32).max:
        raise ConfigError(f"optim.lr={cfg.lr:g} scaled to the global batch {global_batch} ({cfg.lr_scaling}, "
                          f"x{scale:.4g}) is {peak:g}: not a learning rate a float32 step can take")
    return peak


# -- which tensors decay

def _kind(module: nn.Module, param_name: str) -> str:
    """bn_weight | bn_bias | conv_bias | bias | weight: the distinctions the wd_params policies make."""
    # BatchNorm by module type: timm's BatchNormAct2d subclasses BatchNorm2d. A name filter
    # ("bn" in the name) misses tensors whose names do not say so.
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn_weight" if param_name == "weight" else "bn_bias"
    if param_name == "bias":
        return "conv_bias" if isinstance(module, nn.modules.conv._ConvNd) else "bias"
    return "weight"


DECAYS = {  # wd_params policy -> the kinds of tensor that decay
    "all": {"weight", "bias", "conv_bias", "bn_weight", "bn_bias"},
    "no_conv_bias": {"weight", "bias", "bn_weight", "bn_bias"},  # SE convs hold EfficientNet's conv biases
    "weights_only": {"weight", "bn_weight"},  # no bias anywhere; BN gamma is a weight and decays
    "no_bn": {"weight", "bias", "conv_bias"},  # TF: every trainable variable but batch_normalization
    "no_bn_no_bias": {"weight"},  # notes row 32: conv and linear weights only
}


NamedParams = list[tuple[str, nn.Parameter]]


def split_decay(model: nn.Module, policy: str) -> tuple[NamedParams, NamedParams]:
    """(decayed, not decayed) named trainable parameters of `model` under `policy`."""
    if policy not in DECAYS:
        raise ValueError(f"unknown wd_params {policy!r}; valid: {', '.join(DECAYS)}")
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # frozen, or shared with another module
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            (decay if _kind(module, param_name) in DECAYS[policy] else no_decay).append((full, param))
    return decay, no_decay


def describe_decay(cfg: OptimConfig, model: nn.Module) -> str:
    """One line for the run log: what decays, how, and how much of the model each group holds."""
    decay, no_decay = split_decay(model, cfg.wd_params)

    def count(group):
        return f"{len(group)} tensors / {sum(p.numel() for _, p in group):,} params"
    return (f"weight decay {cfg.weight_decay:g} ({cfg.wd_form}, {cfg.wd_params}): "
            f"decay {count(decay)}; no decay {count(no_decay)}")


# -- the optimizers

class DecoupledDecay:
    """Mixin: before the base optimizer's step, shrink each group's parameters by
    `decoupled_wd` (p -= wd * p), times the group's lr when `decoupled_lr` is set.

    Done inside step() on `self.param_groups`, so it acts on whatever tensors the groups
    hold at that moment: the model's own parameters, DeepSpeed's fp32 master copies
    under fp16, or ZeRO 1/2's flat fp32 partitions. A step the fp16 loss scaler skips
    calls no step(), so it decays nothing either."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd = group.get("decoupled_wd", 0.0)
            if wd:
                factor = wd * (group["lr"] if group["decoupled_lr"] else 1.0)
                for p in group["params"]:
                    if p.grad is not None:  # like the base optimizers: untouched without a gradient
                        p.mul_(1.0 - factor)
        return super().step(closure)


class SGD(DecoupledDecay, torch.optim.SGD):
    pass


class RMSpropTFDecay(DecoupledDecay, RMSpropTF):
    pass


class RMSprop(DecoupledDecay, torch.optim.RMSprop):
    pass


class Adam(DecoupledDecay, torch.optim.Adam):
    """With decoupled_lr this is exactly torch's AdamW; its own weight_decay stays 0."""


def _optimizer_factory(cfg: OptimConfig) -> Callable[..., torch.optim.Optimizer]:
    if cfg.name == "sgd":
        return lambda groups, lr: SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "rmsproptf":
        # timm's RMSpropTF with its TF defaults made explicit: lr inside the momentum buffer,
        # ones-initialised square average, eps inside the sqrt
        return lambda groups, lr: RMSpropTFDecay(groups, lr=lr, alpha=cfg.alpha, eps=cfg.eps,
                                                 momentum=cfg.momentum, lr_in_momentum=True)
    if cfg.name == "rmsprop":
        # torch's: square average starts at 0, eps outside the sqrt: first steps ~ lr / sqrt(1 - alpha)
        return lambda groups, lr: RMSprop(groups, lr=lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return lambda groups, lr: Adam(groups, lr=lr, eps=cfg.eps)
    raise ValueError(f"unknown optimizer {cfg.name!r}; valid: sgd, rmsproptf, rmsprop, adamw")


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Two parameter groups (decay, no decay) built by us, not timm's filter_bias_and_bn
    (which drops every 1-D tensor, a rule none of the notes' policies is).

    The base optimizer's own weight_decay carries the coupled form only; the decoupled forms
    live in the group keys `decoupled_wd`/`decoupled_lr`; l2_loss puts nothing here (see
    L2Penalty). `describe_decay` says in one line which tensors decay and how."""
    decay, no_decay = split_decay(model, cfg.wd_params)
    wd = cfg.weight_decay
    groups = []
    for named, group_wd in ((decay, wd), (no_decay, 0.0)):
        if named:
            groups.append({"params": [p for _, p in named],
                           "weight_decay": group_wd if cfg.wd_form == "coupled" else 0.0,
                           "decoupled_wd": group_wd if cfg.wd_form in ("decoupled", "decoupled_lr") else 0.0,
                           "decoupled_lr": cfg.wd_form == "decoupled_lr"})
    return _optimizer_factory(cfg)(groups, lr)


class L2Penalty:
    """TF's weight-decay term, added to the loss before backward:
        weight_decay * tf.add_n([tf.nn.l2_loss(v) for v in trainable_variables if not BN])
    with tf.nn.l2_loss(v) = sum(v**2) / 2. Summed in fp32 whatever the weights' dtype (fp16
    squares of a whole model overflow). It is added to every micro batch's loss, and DeepSpeed
    divides each by the accumulation steps, so the gradient holds it exactly once per step."""

    def __init__(self, params: list[nn.Parameter], weight_decay: float):
        self.params, self.weight_decay = params, weight_decay

    def __call__(self) -> torch.Tensor:
        return self.weight_decay * 0.5 * torch.stack([p.float().pow(2).sum() for p in self.params]).sum()


def build_l2_penalty(cfg: OptimConfig, model: nn.Module) -> Optional[L2Penalty]:
    """None unless wd_form is l2_loss. Build it from the module DeepSpeed trains
    (engine.module), after the engine exists, so it holds the tensors that get gradients."""
    if cfg.wd_form != "l2_loss" or cfg.weight_decay == 0:
        return None
    decay, _ = split_decay(model, cfg.wd_params)
    return L2Penalty([p for _, p in decay], cfg.weight_decay)


# -- the schedule

@dataclass(frozen=True)
class LRSchedule:
    """lr as a function of the global optimizer step (0 = the first step).

    Our own rather than timm's schedulers: TF's staircase decay counts from step 0
    (warmup included) in fractional epochs of global steps, which timm's step
    scheduler (updated per epoch) rounds to whole epochs; that rounding is `exp_epoch`."""
    cfg: ScheduleConfig
    peak: float
    steps_per_epoch: float  # optimizer steps per epoch of the schedule (train.epoch_scale x the data)
    total_steps: int

    def __post_init__(self):
        # the decay's stair count grows with the step: if the last step's lr computes, every step's does
        # (schedule.decay_epochs=1e-320 passed the config and overflowed math.floor at step 1, mid-run)
        try:
            last = self(max(0, self.total_steps - 1))
        except OverflowError:
            last = math.inf
        if not math.isfinite(last):
            raise ConfigError(f"schedule.decay_epochs={self.cfg.decay_epochs} is a stair every "
                              f"{self.cfg.decay_epochs * self.steps_per_epoch:.3g} optimizer steps: too many stairs "
                              f"to count in {self.total_steps} steps")

    @property
    def warmup_steps(self) -> int:
        return int(self.cfg.warmup_epochs * self.steps_per_epoch)  # TF truncates too

    def __call__(self, step: int) -> float:
        c, warmup = self.cfg, self.warmup_steps
        if step < warmup:
            t, start = step / warmup, c.warmup_start_lr * self.peak
            if c.warmup_form == "exponential":
                return start ** (1 - t) * self.peak ** t  # start > 0: the config refuses 0
            return start + (self.peak - start) * t
        # the decay clock: TF counts it from step 0; the other code base from the end of warmup
        clock = step if c.warmup_in_decay_clock else step - warmup
        if c.name == "constant":
            return self.peak
        if c.name == "tf_staircase":
            return self.peak * c.decay_rate ** math.floor(clock / (c.decay_epochs * self.steps_per_epoch))
        if c.name == "exp_epoch":
            return self.peak * c.decay_rate ** math.floor((clock // self.steps_per_epoch) / c.decay_epochs)
        # cosine over the clock's span, reaching min_lr exactly at the last step (total_steps - 1)
        span = self.total_steps - 1 - (0 if c.warmup_in_decay_clock else warmup)
        progress = min(1.0, clock / max(1, span))
        floor = c.min_lr * self.peak
        return floor + (self.peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
