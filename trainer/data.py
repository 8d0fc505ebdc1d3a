"""Data: the embedded digits set or an ImageFolder tree, a fixed train/val split,
transforms, and samplers that shard exactly across ranks.

Samples leave the loader as uint8 tensors (cheap to pass between processes);
`normalize` turns them into floats in the training process.
"""
from __future__ import annotations

import math
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .config import ConfigError, DataConfig


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped inside the package), as
    uint8 RGB images (N, 3, 8, 8) and labels; the transforms upscale them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = torch.from_numpy(digits.images * (255.0 / 16.0)).round().to(torch.uint8)
    return grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digits.target).long()


class DigitsImages(Dataset):
    def __init__(self):
        self.images, self.labels = load_digits_images()
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.labels)

    def load(self, index: int):
        return self.images[index], int(self.labels[index])


class FolderImages(Dataset):
    """An ImageFolder tree (one folder per class), decoded with PIL."""

    def __init__(self, root: str):
        from torchvision.datasets import ImageFolder

        root_path = Path(root)
        if not root_path.is_dir():
            raise ConfigError(f"data folder {root} does not exist")
        try:
            tree = ImageFolder(root)
        except (FileNotFoundError, RuntimeError) as err:
            raise ConfigError(f"data folder {root}: {str(err).splitlines()[0]}") from None
        self.samples, self.classes = tree.samples, tree.classes
        self.labels = torch.tensor([label for _, label in self.samples])

    def __len__(self):
        return len(self.samples)

    def load(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            return img.convert("RGB"), label


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed split: the same images are held out whatever the run seed or world size."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def build_auto_augment(policy: str, image_size: int, translate_pct: float, interpolation: str):
    """timm's AutoAugment ("original", "v0", ... "-mstd0.5") or RandAugment ("rand-m9-mstd0.5") from
    its policy string; a string that does not parse raises ValueError with a one-line message."""
    from timm.data.auto_augment import auto_augment_transform, rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    name, *sections = policy.split("-")
    for section in sections:
        # timm skips a section without a number ("rand-mnine"): we refuse it, so a typo cannot silently
        # drop a setting. RandAugment's "t<name>" (transform set) is the one section without a number.
        if not re.fullmatch(r"[a-z]+\d[\d.]*", section) and not (name == "rand" and section.startswith("t")):
            raise ValueError(f"auto_augment {policy!r}: section {section!r} does not parse (want e.g. m9, mstd0.5)")
    # timm's default fill (128, 128, 128) is TF's; its factory would fill with the dataset mean instead
    # the *Rel ops (v0, original, RandAugment) read translate_pct, the absolute ones translate_const
    hparams = dict(translate_pct=translate_pct, translate_const=int(image_size * translate_pct),
                   interpolation=str_to_pil_interp(interpolation))
    try:
        if name == "rand":
            return rand_augment_transform(policy, hparams)
        return auto_augment_transform(policy, hparams)
    except (AssertionError, ValueError, KeyError) as err:  # timm asserts on unknown names and sections
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"auto_augment {policy!r} does not parse ({reason}); want a timm policy such as "
                         f"'original', 'v0', 'v0r-mstd0.5' or 'rand-m9-mstd0.5'") from None


def train_transform(cfg: DataConfig) -> T.Compose:
    """[AA], random-resized-crop, flip, [AA], color jitter; uint8 out. Random erasing is not here: it
    works on normalized floats, so it runs on the batch in the training process (trainer/mixup.py)."""
    interpolation = T.InterpolationMode(cfg.interpolation)
    aa = []
    if cfg.auto_augment:
        # timm's AA ops work on PIL images (the digits are tensors; PIL images pass through)
        aa = [T.ToPILImage(), build_auto_augment(cfg.auto_augment, cfg.image_size, cfg.aa_translate_pct,
                                                 cfg.interpolation)]
    steps = list(aa) if cfg.aa_order == "before_crop" else []
    # torchvision falls back to a center crop of the whole image after 10 failed tries; TF to its eval crop
    steps.append(T.RandomResizedCrop(cfg.image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                     interpolation=interpolation, antialias=True))
    if cfg.hflip > 0:
        steps.append(T.RandomHorizontalFlip(cfg.hflip))  # drawn per sample: flips with probability hflip
    if cfg.aa_order == "after_crop":
        steps += aa  # TF: crop, flip, then AutoAugment
    if cfg.color_jitter > 0:
        # timm's color_jitter=x: brightness, contrast and saturation x, no hue
        steps.append(T.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                                   saturation=cfg.color_jitter))
    return T.Compose([*steps, T.ToImage(), T.ToDtype(torch.uint8)])


def build_random_erasing(cfg: DataConfig):
    """timm's RandomErasing for the normalized batch, or None when off."""
    if cfg.random_erasing == 0:
        return None
    from timm.data.random_erasing import RandomErasing

    # device="cpu": the fill noise comes from the CPU generator, which `seeded` seeds and restores
    # (timm's default draws it on the GPU's global generator: neither reproducible nor restored)
    return RandomErasing(probability=cfg.random_erasing, mode=cfg.erasing_mode, device="cpu")


def eval_transform(cfg: DataConfig) -> T.Compose:
    """Resize the short side to image_size / crop_pct, then center crop (no squashing)."""
    resize = math.floor(cfg.image_size / cfg.crop_pct)
    interpolation = T.InterpolationMode(cfg.interpolation)
    return T.Compose([T.Resize(resize, interpolation=interpolation, antialias=True),
                      T.CenterCrop(cfg.image_size), T.ToImage(), T.ToDtype(torch.uint8)])


@contextmanager
def seeded(seed: int):
    """Run a block with torch, numpy and python RNGs seeded, then restore them.

    Augmentation random numbers then depend on (run seed, epoch, sample) only:
    they differ across epochs, workers and ranks, and a resumed run redraws
    exactly the numbers the uninterrupted run drew."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also reseed (and fork_rng not restore) the
        # GPU's, so dropout on the GPU would follow the data order when num_workers=0
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class TransformedSubset(Dataset):
    def __init__(self, images, indices: list[int], transform, seed: int):
        self.images, self.indices, self.transform, self.seed = images, indices, transform, seed
        self.epoch = 0  # set before each epoch; workers get a copy when the iterator starts

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.images.load(self.indices[i])
        with seeded(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF):
            return self.transform(image), label


class ResumableSampler(Sampler):
    """The epoch's indices for this rank (DistributedSampler: disjoint shards,
    reshuffled per epoch), starting `skip` samples in when resuming mid-epoch."""

    def __init__(self, base: Sampler):
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self):
        return len(self.base) - self.skip


class ExactShardSampler(Sampler):
    """Validation shard for one rank: every image exactly once across ranks
    (DistributedSampler would pad with duplicates)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_sampler: ResumableSampler
    num_classes: int
    train_size: int  # images in the training split
    val_size: int

    def start_epoch(self, epoch: int, skip_samples: int = 0):
        self.train.dataset.epoch = epoch
        self.train_sampler.set_epoch(epoch, skip_samples)


def build_loaders(cfg: DataConfig, micro_batch: int, seed: int, rank: int, world_size: int) -> Loaders:
    if cfg.source == "imagefolder" and not cfg.path:
        raise ConfigError("data.path is not set: source=imagefolder needs the ImageFolder root "
                          "(for example data.path=/data/imagenet/train)")
    images = DigitsImages() if cfg.source == "digits" else FolderImages(cfg.path)
    if len(images) < 2:
        raise ConfigError(f"data: {cfg.path or cfg.source} holds {len(images)} images; need at least 2")
    train_idx, val_idx = split_indices(len(images), cfg.val_fraction, cfg.split_seed)
    train_set = TransformedSubset(images, train_idx, train_transform(cfg), seed=seed)
    val_set = TransformedSubset(images, val_idx, eval_transform(cfg), seed=seed)
    base = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    train_sampler = ResumableSampler(base)
    # generator: each new iterator draws its workers' base seed from it; from the global generator
    # that draw would shift the model's dropout numbers, so a resumed run would not redraw them exactly
    common = dict(num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=False, generator=torch.Generator().manual_seed(seed))
    return Loaders(
        train=DataLoader(train_set, batch_size=micro_batch, sampler=train_sampler, drop_last=True, **common),
        val=DataLoader(val_set, batch_size=micro_batch, sampler=ExactShardSampler(len(val_set), rank, world_size),
                       **common),
        train_sampler=train_sampler, num_classes=len(images.classes),
        train_size=len(train_set), val_size=len(val_set))


_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255


def normalize(images: torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalized floats, on the training device."""
    images = images.to(device, non_blocking=True).float()
    return ((images - _MEAN.to(device)) / _STD.to(device)).to(dtype)
