"""Loaders: a source opened and split, transforms applied under per-sample seeds, samplers that
shard exactly across ranks and resume mid-epoch, uint8 batches stacked channels-last, and
`normalize`, which turns them into the model's floats in the training process."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from ..config import ConfigError, DataConfig
from .decode import CorruptImage
from .seeding import seeded
from .sources import FolderImages, ImageSource, digits_images, split_indices, synthetic_images
from .transforms import eval_transform, train_transform


def open_source(cfg: DataConfig) -> ImageSource:
    if cfg.source == "digits":
        return digits_images()
    if cfg.source == "synthetic":
        return synthetic_images(cfg.synthetic_images, cfg.image_size, cfg.split_seed)
    if cfg.source == "lmdb":
        from .lmdb_source import LmdbImages

        return LmdbImages(cfg.path)
    return FolderImages(cfg.path)


class TransformedSubset(Dataset):
    def __init__(self, images, indices: list[int], transform, seed: int):
        self.images, self.indices, self.transform, self.seed = images, indices, transform, seed
        self.epoch = 0  # set before each epoch; workers get a copy when the iterator starts

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int):
        # a file that does not decode is replaced by the next one in the subset (deterministic,
        # with sample i's random numbers); the epoch goes on, whatever the worker
        for step in range(len(self.indices)):
            index = self.indices[(i + step) % len(self.indices)]
            try:
                image, label = self.images.encoded(index)
                if self.transform is None:
                    return image, label
                with seeded(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF):
                    return self.transform(image), label
            except CorruptImage as err:
                self.images.report_corrupt(index, err)
        raise RuntimeError(f"none of the {len(self.indices)} images of this split decodes")


def collate_channels_last(batch):
    """default_collate with the images stacked in channels-last memory, shape still (N, 3, H, W).

    The decoding transforms hand back channels-last crops; stacking them as they lie is a plain
    copy, where default_collate's planar stack transposes each one (a third of the worker's
    stacking time, shared memory included). `normalize` gives the model the layout it wants."""
    images, labels = default_collate([(image.permute(1, 2, 0), label) for image, label in batch])
    return images.permute(0, 3, 1, 2), labels


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

    def corrupt_indices(self) -> set[int]:
        """The source's images known not to decode (train and val): found on this rank, or marked."""
        return set(self.train.dataset.images.corrupt.nonzero().flatten().tolist())

    def mark_corrupt(self, indices):
        """Flag images that another rank or an earlier session found corrupt: still replaced when
        drawn, counted, not reported again. The workers see the flags: they are in shared memory."""
        self.train.dataset.images.corrupt[sorted(indices)] = 1


def build_loaders(cfg: DataConfig, micro_batch: int, seed: int, rank: int, world_size: int) -> Loaders:
    if cfg.source in ("imagefolder", "lmdb") and not cfg.path:
        example = "/data/imagenet/train" if cfg.source == "imagefolder" else "/data/imagenet-train.lmdb"
        raise ConfigError(f"data.path is not set: source={cfg.source} needs "
                          f"{'the ImageFolder root' if cfg.source == 'imagefolder' else 'the packed LMDB file'} "
                          f"(for example data.path={example})")
    images = open_source(cfg)
    if len(images) < 2:
        raise ConfigError(f"data: {cfg.path or cfg.source} holds {len(images)} images; need at least 2")
    train_idx, val_idx = split_indices(len(images), cfg.val_fraction, cfg.split_seed)
    synthetic = cfg.source == "synthetic"  # already at size: no transform, the pipeline costs nothing
    train_set = TransformedSubset(images, train_idx, None if synthetic else train_transform(cfg), seed=seed)
    val_set = TransformedSubset(images, val_idx, None if synthetic else eval_transform(cfg), seed=seed)
    base = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    train_sampler = ResumableSampler(base)
    # generator: each new iterator draws its workers' base seed from it; from the global generator
    # that draw would shift the model's dropout numbers, so a resumed run would not redraw them exactly
    common = dict(num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                  collate_fn=collate_channels_last, persistent_workers=False,
                  generator=torch.Generator().manual_seed(seed))
    return Loaders(
        train=DataLoader(train_set, batch_size=micro_batch, sampler=train_sampler, drop_last=True, **common),
        val=DataLoader(val_set, batch_size=micro_batch, sampler=ExactShardSampler(len(val_set), rank, world_size),
                       **common),
        train_sampler=train_sampler, num_classes=len(images.classes),
        train_size=len(train_set), val_size=len(val_set))


_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255


def normalize(images: torch.Tensor, device, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, 3, H, W), in either memory layout -> normalized floats on the training device,
    NHWC in memory when channels_last, else NCHW."""
    images = images.to(device, non_blocking=True).float()
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return ((images - _MEAN.to(device)) / _STD.to(device)).to(dtype)
