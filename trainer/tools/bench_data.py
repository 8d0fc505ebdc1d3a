"""Input-pipeline throughput: our training transforms against torchvision's ImageFolder, same run.

    python -m trainer bench data --source /data/imagenet/train --workers 1 --images 2000
    python -m trainer bench data --source /data/imagenet-train.lmdb
    python -m trainer bench data --source /data/imagenet/train --auto-augment v0   # the TF recipe's

Each row loads the same images (a fixed random subset) through a DataLoader with the same number
of workers and batch size, and reports images/s over the whole pass, worker start-up included, and
per worker. The baseline is torchvision's ImageFolder (PIL full decode, `convert("RGB")`) with the
timm-style training transforms at the same size: RandomResizedCrop (same scale, ratio and filter)
and a horizontal flip, to a uint8 tensor (what timm's train.py hands its GPU prefetcher, with the
default collate). For an LMDB source the baseline decodes the same bytes fully with PIL and runs the
same torchvision transforms. Our rows are the trainer's own loader (decoding crop, channels-last
collate): full decode, reduced-size decode, then TF's fast IDCT. With `auto_augment`, every row runs
it after the crop: the baseline as timm's train.py does (its default train interpolation, 'random':
bilinear or bicubic drawn per op), ours as the trainer does (`data.aa_interpolation`, TF's nearest).
Rows run alternately, `repeats` times; the best pass of each is reported (a shared machine only
ever slows a pass down).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from pydantic import ValidationError
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import ConfigError, DataConfig, describe_validation_error
from ..data.augment import build_auto_augment
from ..data.loaders import TransformedSubset, collate_channels_last, open_source
from ..data.transforms import train_transform


class FullDecode(Dataset):
    """Baseline over a source that is not a folder: PIL full decode, then torchvision's transforms."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, label = self.images.load(index)
        return self.transform(image), label


def images_per_s(dataset, workers: int, batch: int, collate_fn=None) -> float:
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False, collate_fn=collate_fn)
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += len(images)
    return count / (time.perf_counter() - start)


def bench_data(source: str, workers: int = 1, images: int = 2000, image_size: int = 224, batch: int = 32,
               repeats: int = 2, seed: int = 0, auto_augment: str | None = None) -> list[dict]:
    path = Path(source)
    kind = "imagefolder" if path.is_dir() else "lmdb"
    try:
        cfg = DataConfig(source=kind, path=str(path), image_size=image_size, num_workers=workers,
                         auto_augment=auto_augment)
    except ValidationError as err:
        raise ConfigError(f"bench data: {describe_validation_error(err)}") from None
    ours = open_source(cfg)
    if len(ours) == 0:
        raise ConfigError(f"bench data: {source} holds no images")
    picked = torch.randperm(len(ours), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    # timm's training transforms at the same size and settings, full decode
    timm_aa = []  # as timm's train.py runs the policy: its default train interpolation, 'random'
    if auto_augment:
        timm_aa = [build_auto_augment(auto_augment, image_size, cfg.aa_translate_pct, interpolation="random",
                                      tf_posterize=False)]
    reference = T.Compose([T.RandomResizedCrop(image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                               interpolation=T.InterpolationMode(cfg.interpolation), antialias=True),
                           T.RandomHorizontalFlip(cfg.hflip), *timm_aa, T.ToImage(), T.ToDtype(torch.uint8)])
    if kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        baseline = ("torchvision ImageFolder, full decode", Subset(ImageFolder(str(path), transform=reference), picked))
    else:
        baseline = ("PIL full decode of the LMDB bytes + torchvision transforms", Subset(FullDecode(ours, reference), picked))
    # ours: the full decode, then the reduced-size decode, with PIL's IDCT, then with TF's (the default)
    rows = [(*baseline, None)]
    for draft, dct in ((False, "accurate"), (True, "accurate"), (True, "fast")):
        transform = train_transform(cfg.model_copy(update={"jpeg_draft": draft, "jpeg_dct": dct}))
        rows.append((f"trainer {kind}, jpeg_draft={str(draft).lower()} jpeg_dct={dct}",
                     TransformedSubset(ours, picked, transform, seed), collate_channels_last))
    # TF's pipeline (the tf_efficientnet recipes'): its crop sampler, full decode, legacy bicubic
    tf_transform = train_transform(cfg.model_copy(update={"pipeline": "tf"}))
    rows.append((f"trainer {kind}, pipeline=tf", TransformedSubset(ours, picked, tf_transform, seed),
                 collate_channels_last))
    best = {name: 0.0 for name, _, _ in rows}
    for _ in range(repeats):
        for name, dataset, collate in rows:
            best[name] = max(best[name], images_per_s(dataset, workers, batch, collate))
    base = best[rows[0][0]]
    return [{"loader": name, "images": len(picked), "images_per_s": rate, "per_worker": rate / max(workers, 1), "ratio": rate / base}
            for name, rate in best.items()]


def print_table(rows: list[dict], source: str, workers: int, image_size: int, batch: int,
                auto_augment: str | None = None):
    augment = f" with AutoAugment {auto_augment}" if auto_augment else ""
    print(f"bench data: {source}: {rows[0]['images']} images, {image_size} px training transforms{augment}, "
          f"{workers} worker(s), batch {batch}, {os.cpu_count()} CPU cores")
    width = max(len(r["loader"]) for r in rows)
    print(f"{'loader':<{width}}  {'images/s':>9}  {'per worker':>10}  {'vs baseline':>11}")
    for r in rows:
        print(f"{r['loader']:<{width}}  {r['images_per_s']:9.1f}  {r['per_worker']:10.1f}  {r['ratio']:10.2f}x")
