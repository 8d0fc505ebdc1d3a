"""The training loss: cross-entropy with TF's label smoothing, on hard labels or on the
soft targets mixup makes, built from the `loss` section.

TF smooths the (possibly mixed) one-hot targets: t = t * (1 - eps) + eps / classes, and
the loss is -sum(t * log_softmax(logits)). Smoothing is linear, so smoothing after mixup
equals mixing smoothed targets: mixup never smooths (see trainer/data/batch_augment.py), the loss
always does, whether or not mixup is on.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LossConfig


class SmoothedCrossEntropy(nn.Module):
    """log_softmax in fp32, whatever the logits' dtype: finite for fp16 logits of any spread.
    torch's cross_entropy implements TF's smoothing exactly, for class indices and for
    probability targets alike."""

    def __init__(self, smoothing: float):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.smoothing)


class LogOfSoftmaxCrossEntropy(nn.Module):
    """The notes' broken "label smoothing v2" (row 5), kept to reproduce it: log(softmax(x))
    in the logits' own dtype. In fp16 a probability below ~6e-8 rounds to 0 and its log is
    -inf; with smoothing every class has a target weight, so the loss is inf."""

    def __init__(self, smoothing: float):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[-1]
        if targets.ndim == 1:
            targets = F.one_hot(targets, num_classes)
        targets = targets.to(logits.dtype) * (1 - self.smoothing) + self.smoothing / num_classes
        log_probs = torch.log(torch.softmax(logits, dim=-1))  # the hazard: no log-sum-exp, no fp32
        return -(targets * log_probs).sum(dim=-1).float().mean()


LOSSES = {"log_softmax": SmoothedCrossEntropy, "log_of_softmax_unstable": LogOfSoftmaxCrossEntropy}


def build_loss(cfg: LossConfig) -> nn.Module:
    """criterion(logits, targets): targets are class indices (N,) or probabilities (N, classes)."""
    return LOSSES[cfg.smoothing_impl](cfg.label_smoothing)
