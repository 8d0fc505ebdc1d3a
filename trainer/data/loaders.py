"""Loaders: a source opened and split, transforms applied under per-sample seeds, samplers that
shard exactly across ranks and resume mid-epoch, uint8 batches stacked channels-last, and
`normalize`, which turns them into the model's floats in the training process."""
from __future__ import annotations

import copy
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from ..config import ConfigError, DataConfig
from .decode import CorruptImage
from .seeding import seeded
from .sources import FolderImages, ImageSource, digits_images, split_indices, synthetic_images
from .transforms import eval_transform, train_transform


def open_source(cfg: DataConfig) -> ImageSource:
    if cfg.source in ("imagefolder", "lmdb") and not cfg.path:
        example = "/data/imagenet/train" if cfg.source == "imagefolder" else "/data/imagenet-train.lmdb"
        raise ConfigError(f"data.path is not set: source={cfg.source} needs "
                          f"{'the ImageFolder root' if cfg.source == 'imagefolder' else 'the packed LMDB file'} "
                          f"(for example data.path={example})")
    if cfg.source == "digits":
        return digits_images()
    if cfg.source == "synthetic":
        needed = cfg.synthetic_images * 3 * cfg.image_size ** 2
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if needed > memory:  # held in memory as one tensor: refused here rather than by the allocator
            raise ConfigError(f"data.synthetic_images={cfg.synthetic_images} at data.image_size {cfg.image_size} "
                              f"need {needed / 2**30:.3g} GiB, more than this machine's {memory / 2**30:.3g} GiB")
        return synthetic_images(cfg.synthetic_images, cfg.image_size, cfg.split_seed)
    return open_path(cfg.path, lmdb=cfg.source == "lmdb")


def open_path(path: str, lmdb: bool) -> ImageSource:
    if lmdb:
        from .lmdb_source import LmdbImages

        return LmdbImages(path)
    return FolderImages(path)


def open_validation(cfg: DataConfig, train: ImageSource) -> ImageSource:
    """data.val_path: an ImageFolder tree, or an LMDB file packed from one, with the training classes."""
    if cfg.source not in ("imagefolder", "lmdb"):
        raise ConfigError(f"data.val_path needs source imagefolder or lmdb (source is {cfg.source})")
    val = open_path(cfg.val_path, lmdb=Path(cfg.val_path).is_file())
    if val.classes != train.classes:
        first = next((i for i, (a, b) in enumerate(zip(train.classes, val.classes)) if a != b),
                     min(len(train.classes), len(val.classes)))
        there = lambda classes: repr(classes[first]) if first < len(classes) else "nothing"  # noqa: E731
        raise ConfigError(f"data.val_path {cfg.val_path}: its classes differ from data.path's at class {first}: "
                          f"{there(val.classes)} there, {there(train.classes)} in the training data "
                          f"({len(val.classes)} vs {len(train.classes)} classes)")
    return val


@dataclass(frozen=True)
class Split:
    """Which images train and which evaluate, and what the evaluation numbers are of."""
    train: ImageSource
    train_indices: list[int]
    val: ImageSource
    val_indices: list[int]
    description: str  # for the banner and summary.json


def split_sources(cfg: DataConfig) -> Split:
    """All of data.path trains when data.val_path is set; otherwise a fixed fraction of it is held out."""
    images = open_source(cfg)
    if len(images) < 2:
        raise ConfigError(f"data: {cfg.path or cfg.source} holds {len(images)} images; need at least 2")
    if cfg.val_path:
        val = open_validation(cfg, images)
        return Split(images, list(range(len(images))), val, list(range(len(val))),
                     f"data.val_path {cfg.val_path} ({len(val)} images)")
    train_idx, val_idx = split_indices(len(images), cfg.val_fraction, cfg.split_seed)
    held_out = (f"{len(val_idx)} images held out of the training data (data.val_fraction {cfg.val_fraction}, "
                f"split_seed {cfg.split_seed})")
    if cfg.source in ("imagefolder", "lmdb"):
        held_out += ": not a separate validation set; set data.val_path for one"
    return Split(images, train_idx, images, val_idx, held_out)


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
        raise ConfigError(f"data: none of the {len(self.indices)} images of this split decodes "
                          f"(each is reported above as corrupt or unreadable)")

    def check_one_decodes(self) -> None:
        """Draw sample 0 as the first step will (ConfigError when no image decodes): a tree where every
        file is corrupt is refused at build, before the run directory is written, at the cost of one
        decode when image 0 is fine. Its random numbers are (seed, epoch, 0)'s: nothing else moves."""
        if self.indices:
            probe = copy.copy(self)
            # a copy of the source as a worker gets it (pickled state: the corrupt flags shared), so a
            # handle the probe opens (an LMDB environment) is not inherited by the forked workers
            probe.images = copy.copy(self.images)
            probe[0]


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
    validation: str  # what the evaluation numbers are of

    def start_epoch(self, epoch: int, skip_samples: int = 0):
        self.train.dataset.epoch = epoch
        self.train_sampler.set_epoch(epoch, skip_samples)

    def _flag_sets(self) -> list[torch.Tensor]:
        """The corrupt flags of the training source, then of a separate validation source."""
        train, val = self.train.dataset.images, self.val.dataset.images
        return [train.corrupt] if val is train else [train.corrupt, val.corrupt]

    def corrupt_indices(self) -> set[int]:
        """The images known not to decode (train and val): found on this rank, or marked. A separate
        validation source's images are numbered after the training source's."""
        found, offset = set(), 0
        for flags in self._flag_sets():
            found |= {offset + i for i in flags.nonzero().flatten().tolist()}
            offset += len(flags)
        return found

    def mark_corrupt(self, indices):
        """Flag images that another rank or an earlier session found corrupt: still replaced when
        drawn, counted, not reported again. The workers see the flags: they are in shared memory."""
        offset = 0
        for flags in self._flag_sets():
            mine = [i - offset for i in indices if offset <= i < offset + len(flags)]
            flags[mine] = 1
            offset += len(flags)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker leaves SIGINT and SIGTERM to the training process. A cluster signals every
    process of a job: a worker that died of it would fail the run ("DataLoader worker killed by signal")
    before the training process could checkpoint; the loader ends its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader_options(cfg: DataConfig, seed: int) -> dict:
    # generator: each new iterator draws its workers' base seed from it; from the global generator
    # that draw would shift the model's dropout numbers, so a resumed run would not redraw them exactly
    return dict(num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                collate_fn=collate_channels_last, persistent_workers=False,
                generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals)


def val_loader(split: Split, cfg: DataConfig, batch: int, seed: int, rank: int, world_size: int) -> DataLoader:
    """Every validation image exactly once over the ranks, with the eval transform."""
    synthetic = cfg.source == "synthetic"  # already at size: no transform
    val_set = TransformedSubset(split.val, split.val_indices, None if synthetic else eval_transform(cfg), seed=seed)
    val_set.check_one_decodes()
    return DataLoader(val_set, batch_size=batch, sampler=ExactShardSampler(len(val_set), rank, world_size),
                      **loader_options(cfg, seed))


def build_loaders(cfg: DataConfig, micro_batch: int, seed: int, rank: int, world_size: int) -> Loaders:
    split = split_sources(cfg)
    synthetic = cfg.source == "synthetic"  # already at size: no transform, the pipeline costs nothing
    train_set = TransformedSubset(split.train, split.train_indices, None if synthetic else train_transform(cfg),
                                  seed=seed)
    train_set.check_one_decodes()
    base = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    train_sampler = ResumableSampler(base)
    val = val_loader(split, cfg, micro_batch, seed, rank, world_size)
    return Loaders(
        train=DataLoader(train_set, batch_size=micro_batch, sampler=train_sampler, drop_last=True,
                         **loader_options(cfg, seed)),
        val=val, train_sampler=train_sampler, num_classes=len(split.train.classes),
        train_size=len(train_set), val_size=len(val.dataset), validation=split.description)


_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255


def normalize(images: torch.Tensor, device, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, 3, H, W), in either memory layout -> normalized floats on the training device,
    NHWC in memory when channels_last, else NCHW."""
    images = images.to(device, non_blocking=True).float()
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return ((images - _MEAN.to(device)) / _STD.to(device)).to(dtype)
