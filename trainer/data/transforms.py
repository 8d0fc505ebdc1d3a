"""The per-image transforms, in the loader's workers: decode + random crop + resize, flip,
AutoAugment and color jitter for training; decode + center crop + resize for evaluation, either
torchvision's way or TF's (data.pipeline, tf_pipeline.py). uint8 tensors out (normalizing happens
in the training process, see loaders.normalize)."""
from __future__ import annotations

import math

import torchvision.transforms.v2 as T

from ..config import DataConfig
from .augment import build_auto_augment
from .decode import Decode, DecodeRandomResizedCrop, DecodeResize
from .tf_pipeline import TFCenterCrop, TFRandomCrop, crop_padding_for_fraction


def train_transform(cfg: DataConfig) -> T.Compose:
    """[AA], random-resized-crop, flip, [AA], color jitter; a uint8 tensor out. Random erasing is not
    here: it works on normalized floats, so it runs on the batch in the training process (batch_augment.py)."""
    interpolation = T.InterpolationMode(cfg.interpolation)
    aa = []
    if cfg.auto_augment:
        # timm's AA ops work on PIL images (the digits are tensors; PIL images pass through)
        aa = [T.ToPILImage(), build_auto_augment(cfg.auto_augment, cfg.image_size, cfg.aa_translate_pct,
                                                 cfg.aa_interpolation, tf_posterize=cfg.pipeline == "tf")]
    # AA before the crop needs the decoded image; otherwise the crop decodes (at reduced size if it can)
    steps = [Decode(), *aa] if cfg.aa_order == "before_crop" else []
    # torchvision falls back to a center crop of the whole image after 10 failed tries; TF to its eval crop
    if cfg.pipeline == "tf":
        steps.append(TFRandomCrop(cfg.image_size, tf_crop_padding(cfg), fast_dct=cfg.jpeg_dct == "fast"))
    else:
        steps.append(DecodeRandomResizedCrop(cfg.image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                             interpolation=interpolation, antialias=True, draft=cfg.jpeg_draft,
                                             fast_dct=cfg.jpeg_dct == "fast"))
    if cfg.hflip > 0:
        steps.append(T.RandomHorizontalFlip(cfg.hflip))  # drawn per sample: flips with probability hflip
    if cfg.aa_order == "after_crop":
        steps += aa  # TF: crop, flip, then AutoAugment
    if cfg.color_jitter > 0:
        # timm's color_jitter=x: brightness, contrast and saturation x, no hue
        steps.append(T.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                                   saturation=cfg.color_jitter))
    if aa:
        steps.append(T.PILToTensor())  # timm's AA ops hand back PIL images; tensors pass through
    return T.Compose(steps)


def tf_crop_padding(cfg: DataConfig) -> int:
    """TF's eval crop, image_size / (image_size + padding) of the short side, as the fraction crop_pct
    (TF's current code: 0.875; the published B1-B7 checkpoints' code: padding 32, crop_pct S / (S + 32))."""
    return crop_padding_for_fraction(cfg.image_size, cfg.crop_pct)


def eval_transform(cfg: DataConfig) -> T.Compose:
    """torchvision: resize the short side to image_size / crop_pct, then center crop (no squashing).
    tf: crop crop_pct of the short side at the center, then resize it (TF's legacy bicubic)."""
    if cfg.pipeline == "tf":
        return T.Compose([TFCenterCrop(cfg.image_size, tf_crop_padding(cfg), fast_dct=cfg.jpeg_dct == "fast")])
    resize = math.floor(cfg.image_size / cfg.crop_pct)
    interpolation = T.InterpolationMode(cfg.interpolation)
    return T.Compose([DecodeResize(resize, interpolation=interpolation, antialias=True, draft=cfg.jpeg_draft,
                                   fast_dct=cfg.jpeg_dct == "fast"),
                      T.CenterCrop(cfg.image_size)])
