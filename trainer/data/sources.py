"""Where images come from: the embedded digits, synthetic images, an ImageFolder tree (an LMDB
packed from one is in lmdb_source.py), and the fixed train/val split.

A folder or LMDB source hands the transforms the file's bytes (`encoded`); the first transform
decodes them. A file that does not decode is reported once and flagged in shared memory
(`ImageSource.corrupt`), so the loader replaces it and the run counts it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from .decode import CorruptImage, EncodedImage, decoded_rgb
from .folder_scan import scan_image_folder


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
    """An ImageFolder tree (one folder per class): torchvision's classes and order, a scan that follows
    no symlink loop and never gives a file two labels (folder_scan.py), our decode."""

    def __init__(self, root: str):
        root_path = Path(root)
        if not root_path.is_dir():
            raise ConfigError(f"data folder {root} does not exist")
        try:
            tree = scan_image_folder(root)
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


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed split: the same images are held out whatever the run seed or world size."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])
