"""Data: the embedded digits set, an ImageFolder tree or an LMDB packed from one
(trainer/lmdb_source.py), a fixed train/val split, transforms, and samplers that shard exactly
across ranks.

A folder or LMDB source hands the transforms the file's bytes; the first transform decodes them,
a large JPEG at reduced size where the crop allows (trainer/decode.py). A file that does not
decode is reported once, replaced by the next sample and counted (`Loaders.corrupt_indices`).
Samples leave the loader as uint8 tensors (cheap to pass between processes); `normalize` turns
them into floats in the training process.
"""
from __future__ import annotations

import math
import random
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import auto_augment_transform, rand_augment_transform
from timm.data.auto_augment import posterize as timm_posterize  # named apart from ours below
from timm.data.transforms import str_to_pil_interp
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from .config import ConfigError, DataConfig
from .decode import CorruptImage, Decode, DecodeRandomResizedCrop, DecodeResize, EncodedImage, decoded_rgb


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped inside the package), as
    uint8 RGB images (N, 3, 8, 8) and labels; the transforms upscale them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = torch.from_numpy(digits.images * (255.0 / 16.0)).round().to(torch.uint8)
    return grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digits.target).long()


class ImageSource(Dataset):
    """A set of images: `encoded(i)` -> (what the transforms decode, label); `load(i)` -> decoded.

    `corrupt` flags the images found not to decode, in shared memory: DataLoader workers set the
    flags, the training process reads the count, and each file is reported once per run, not
    once per worker or per epoch."""

    def init_corrupt_flags(self):
        self.corrupt = torch.zeros(len(self), dtype=torch.uint8).share_memory_()

    def encoded(self, index: int):
        return self.load(index)

    def name(self, index: int) -> str:
        return f"image {index}"

    def report_corrupt(self, index: int, err: CorruptImage):
        if not self.corrupt[index]:
            self.corrupt[index] = 1
            print(f"warning: skipping corrupt or unreadable image {self.name(index)}: {err} "
                  f"(replaced by the next sample; reported once)", file=sys.stderr, flush=True)


class TensorImages(ImageSource):
    """Images held in memory as one uint8 tensor (N, 3, H, W), with their labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.images, self.labels, self.classes = images, labels, classes
        self.init_corrupt_flags()

    def __len__(self):
        return len(self.labels)

    def load(self, index: int):
        return self.images[index], int(self.labels[index])


def digits_images() -> TensorImages:
    return TensorImages(*load_digits_images(), classes=[str(i) for i in range(10)])


def synthetic_images(count: int, size: int, seed: int, classes: int = 1000) -> TensorImages:
    """Random uint8 images at their final size and random labels, fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    return TensorImages(images, labels, classes=[str(i) for i in range(classes)])


class FolderImages(ImageSource):
    """An ImageFolder tree (one folder per class): torchvision's scan, our decode."""

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
        self.init_corrupt_flags()

    def __len__(self):
        return len(self.samples)

    def name(self, index: int) -> str:
        return self.samples[index][0]

    def encoded(self, index: int):
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                return EncodedImage(f.read(), path), label
        except OSError as err:  # gone, or no permission: replaced and counted like a corrupt file
            raise CorruptImage(err.strerror or str(err)) from err

    def load(self, index: int):
        image, label = self.encoded(index)
        return decoded_rgb(image.data)[0], label


def open_source(cfg: DataConfig) -> ImageSource:
    if cfg.source == "digits":
        return digits_images()
    if cfg.source == "synthetic":
        return synthetic_images(cfg.synthetic_images, cfg.image_size, cfg.split_seed)
    if cfg.source == "lmdb":
        from .lmdb_source import LmdbImages

        return LmdbImages(cfg.path)
    return FolderImages(cfg.path)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed split: the same images are held out whatever the run seed or world size."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def build_auto_augment(policy: str, image_size: int, translate_pct: float, interpolation: str):
    """timm's AutoAugment ("original", "v0", ... "-mstd0.5") or RandAugment ("rand-m9-mstd0.5") from
    its policy string, its geometric ops resampling with `interpolation` ("random": timm's draw); a
    string that does not parse raises ValueError with a one-line message."""
    name, *sections = policy.split("-")
    for section in sections:
        # timm skips a section without a number ("rand-mnine"): we refuse it, so a typo cannot silently
        # drop a setting. RandAugment's "t<name>" (transform set) is the one section without a number.
        if not re.fullmatch(r"[a-z]+\d[\d.]*", section) and not (name == "rand" and section.startswith("t")):
            raise ValueError(f"auto_augment {policy!r}: section {section!r} does not parse (want e.g. m9, mstd0.5)")
    # timm's default fill (128, 128, 128) is TF's; its factory would fill with the dataset mean instead
    # the *Rel ops (v0, original, RandAugment) read translate_pct, the absolute ones translate_const
    hparams = dict(translate_pct=translate_pct, translate_const=int(image_size * translate_pct))
    if interpolation != "random":  # without it timm draws bilinear or bicubic for each op
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    try:
        if name == "rand":
            transform = rand_augment_transform(policy, hparams)
            ops = transform.ops
        else:
            transform = auto_augment_transform(policy, hparams)
            ops = [op for sub_policy in transform.policy for op in sub_policy]
    except (AssertionError, ValueError, KeyError) as err:  # timm asserts on unknown names and sections
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"auto_augment {policy!r} does not parse ({reason}); want a timm policy such as "
                         f"'original', 'v0', 'v0r-mstd0.5' or 'rand-m9-mstd0.5'") from None
    for op in ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize_keeping_zero_bits
    return transform


def posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, except at 0 bits: TF's v0 policy asks for 0 (its ('Posterize', 0.8, 2)
    keeps int(2 / 10 * 4) bits), as do RandAugment's top magnitudes. TF and older Pillow give a
    black image; Pillow 13 raises ValueError, which stopped every image that drew that op."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_posterize(img, bits_to_keep)


def train_transform(cfg: DataConfig) -> T.Compose:
    """[AA], random-resized-crop, flip, [AA], color jitter; a uint8 tensor out. Random erasing is not
    here: it works on normalized floats, so it runs on the batch in the training process (mixup.py)."""
    interpolation = T.InterpolationMode(cfg.interpolation)
    aa = []
    if cfg.auto_augment:
        # timm's AA ops work on PIL images (the digits are tensors; PIL images pass through)
        aa = [T.ToPILImage(), build_auto_augment(cfg.auto_augment, cfg.image_size, cfg.aa_translate_pct,
                                                 cfg.aa_interpolation)]
    # AA before the crop needs the decoded image; otherwise the crop decodes (at reduced size if it can)
    steps = [Decode(), *aa] if cfg.aa_order == "before_crop" else []
    # torchvision falls back to a center crop of the whole image after 10 failed tries; TF to its eval crop
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
    return T.Compose([DecodeResize(resize, interpolation=interpolation, antialias=True, draft=cfg.jpeg_draft,
                                   fast_dct=cfg.jpeg_dct == "fast"),
                      T.CenterCrop(cfg.image_size)])


@contextmanager
def seeded(seed: int):
    """Run a block with torch, numpy and python RNGs seeded, then restore them.

    Augmentation random numbers then depend on (run seed, epoch, sample) only:
    they differ across epochs, workers and ranks, and a resumed run redraws
    exactly the numbers the uninterrupted run drew."""
    if torch.utils.data.get_worker_info() is not None:
        # a DataLoader worker: nothing else draws from its generators, so skip the save and restore
        # (numpy's get_state/set_state alone cost ~0.1 ms, a third of a small image's whole load)
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        yield
        return
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
