"""Augmentation of the normalized batch, in the training process: random erasing per
sample, then mixup or cutmix (the `mixup` section). The loader hands out uint8 images;
both of these need normalized floats, so they run here, in train_step.

Random numbers are a pure function of (run seed, rank, epoch, micro batch in epoch): a
resumed run redraws exactly what the uninterrupted run drew, and ranks differ.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError, DataConfig, MixupConfig
from .seeding import seeded


def tf_mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float, rng: np.random.Generator):
    """TF's reference mixup: one lambda per sample from Beta(alpha, alpha), lambda = max(lambda,
    1 - lambda), sample i mixed with sample n-1-i of the same batch (imgs[::-1]), and its targets
    with the same weights. timm's closest mode, 'elem', has no max(lambda, 1 - lambda).

    images (N, C, H, W) floats, targets (N, classes) probabilities -> mixed images, targets, lambdas."""
    lam = rng.beta(alpha, alpha, size=len(images))
    lam = np.maximum(lam, 1.0 - lam)  # each sample stays the larger part of its own mix
    weight = torch.as_tensor(lam, dtype=images.dtype, device=images.device)
    w_img = weight.view(-1, 1, 1, 1)
    mixed = images * w_img + images.flip(0) * (1 - w_img)
    w_tgt = weight.to(targets.dtype).view(-1, 1)
    return mixed, targets * w_tgt + targets.flip(0) * (1 - w_tgt), lam


class BatchAugment:
    """inputs, targets -> inputs, targets. Targets leave as class indices when nothing mixes,
    as probabilities (N, classes) when mixup/cutmix is on. Never smoothed here: the loss
    smooths, the same way with and without mixup."""

    def __init__(self, erasing, mixup: MixupConfig, num_classes: int, seed: int, rank: int):
        self.erasing, self.mode, self.alpha = erasing, mixup.mode, mixup.alpha
        self.num_classes, self.seed, self.rank = num_classes, seed, rank
        self.timm_mixup = None
        if mixup.mode in ("batch", "pair"):
            from timm.data import Mixup

            # label_smoothing=0: timm would smooth here and the loss again (and not at all without mixup)
            self.timm_mixup = Mixup(mixup_alpha=mixup.alpha, cutmix_alpha=mixup.cutmix_alpha, prob=mixup.prob,
                                    switch_prob=mixup.switch_prob, mode=mixup.mode, label_smoothing=0.0,
                                    num_classes=num_classes)

    def key(self, epoch: int, batch: int) -> int:
        return hash((self.seed, self.rank, epoch, batch)) & 0x7FFF_FFFF_FFFF

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, epoch: int, batch: int):
        key = self.key(epoch, batch)
        # seeded: timm's erasing draws from python's random and torch, timm's Mixup from numpy
        with seeded(key):
            if self.erasing is not None:
                inputs = self.erasing(inputs)  # per sample: its own chance, box and fill
            if self.mode == "tf":
                onehot = F.one_hot(targets, self.num_classes).float()
                inputs, targets, _ = tf_mixup(inputs, onehot, self.alpha, np.random.default_rng(key))
            elif self.timm_mixup is not None:
                inputs, targets = self.timm_mixup(inputs, targets)  # partner: the flipped batch
        return inputs, targets


def build_random_erasing(cfg: DataConfig):
    """timm's RandomErasing for the normalized batch, or None when off."""
    if cfg.random_erasing == 0:
        return None
    from timm.data.random_erasing import RandomErasing

    # device="cpu": the fill noise comes from the CPU generator, which `seeded` seeds and restores
    # (timm's default draws it on the GPU's global generator: neither reproducible nor restored)
    return RandomErasing(probability=cfg.random_erasing, mode=cfg.erasing_mode, device="cpu")


def build_batch_augment(data: DataConfig, mixup: MixupConfig, num_classes: int, micro_batch: int,
                        seed: int, rank: int) -> BatchAugment | None:
    """None when there is nothing to do on the batch (no erasing, mixup off)."""
    erasing = build_random_erasing(data)
    if erasing is None and mixup.mode == "off":
        return None
    if mixup.mode in ("batch", "pair") and micro_batch % 2:
        raise ConfigError(f"mixup.mode={mixup.mode} pairs samples i and n-1-i: train.micro_batch must be even, "
                          f"got {micro_batch}")
    return BatchAugment(erasing, mixup, num_classes, seed, rank)
