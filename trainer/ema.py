"""The exponential moving average of the weights: an fp32 copy of the bare model, BN buffers included,
updated after every applied optimizer step (never after a skipped one)."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from .config import EmaConfig


class Ema(ModelEmaV3):
    """timm's ModelEmaV3 (weights and buffers), with the tensor pairs listed once: timm walks both
    state_dicts at every update, a cost on the order of a few percent of a small model's CPU step.
    The lists hold the tensors themselves (keep_vars), which DeepSpeed and loading update in place."""

    _pairs = None

    def apply_update_(self, model, decay: float):
        if self._pairs is None or self._pairs[0] is not model:
            both = list(zip(self.module.state_dict(keep_vars=True).values(),
                            model.state_dict(keep_vars=True).values()))
            floats = [(e, m) for e, m in both if e.is_floating_point()]
            self._pairs = (model, [e for e, _ in floats], [m for _, m in floats],
                           [(e, m) for e, m in both if not e.is_floating_point()])
        _, ema_floats, model_floats, others = self._pairs
        self._foreach_lerp_(ema_floats, model_floats, weight=1.0 - decay)
        for ema_v, model_v in others:  # BN's num_batches_tracked
            ema_v.copy_(model_v)


class TFDecayEma(Ema):
    """TF's ExponentialMovingAverage(decay, num_updates): the decay is min(decay, (1 + n) / (10 + n)),
    a ramp timm's warmup formula does not reproduce."""

    def get_decay(self, step=None) -> float:
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))


def build_ema(model: nn.Module, cfg: EmaConfig, device) -> Ema:
    """EMA on its own fp32 copy of the bare model, BN buffers included.

    Build it before DeepSpeed wraps (and, in fp16, casts) the model, so it never shares
    tensors with the engine and never holds reduced-precision weights."""
    ema_class = TFDecayEma if cfg.warmup == "tf" else Ema
    ema = ema_class(model, decay=cfg.decay, use_warmup=cfg.warmup == "timm",
                    device=device, dtype=torch.float32, exclude_buffers=False)
    ema.module.requires_grad_(False)
    return ema
