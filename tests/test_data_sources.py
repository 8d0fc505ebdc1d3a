"""Data sources at ImageNet scale: LMDB packs, reduced-size JPEG decoding, corrupt files,
distributed shards over the new sources, and the data bench. Real files in tmp_path, real LMDB."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from conftest import REPO, TINY, corrupt_tree, image_tree, read_jsonl, run_cli, smooth_image
from trainer.config import ConfigError, DataConfig
from trainer.data.loaders import build_loaders, normalize
from trainer.data.seeding import seeded
from trainer.data.sources import FolderImages
from trainer.data.transforms import eval_transform
from trainer.data.decode import DecodeRandomResizedCrop, DecodeResize, EncodedImage, draft_scale_for
from trainer.data.lmdb_source import LmdbImages, pack


def packed(tmp_path, tree):
    dst = tmp_path / "set.lmdb"
    pack(tree, dst, progress=False)
    return dst


# -- pack: the same samples, labels, class list and pixels as the tree

def test_pack_reads_back_as_the_tree(tmp_path):
    tree = image_tree(tmp_path / "tree")
    result = run_cli("pack", tree, tmp_path / "out" / "set.lmdb", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "packed 18 images of 3 classes" in result.stdout
    assert "18/18" in result.stderr  # the tqdm progress bar
    assert os.listdir(tmp_path / "out") == ["set.lmdb"]  # renamed into place, no tmp left behind

    folder, lmdb = FolderImages(str(tree)), LmdbImages(str(tmp_path / "out" / "set.lmdb"))
    assert lmdb.classes == folder.classes == ["cat", "dog", "fox"]
    assert len(lmdb) == len(folder) == 18 and torch.equal(lmdb.labels, folder.labels)
    transform = eval_transform(DataConfig(image_size=16, crop_pct=0.875))
    for i in range(len(folder)):
        (enc_f, label_f), (enc_l, label_l) = folder.encoded(i), lmdb.encoded(i)
        assert label_f == label_l and enc_f.data == enc_l.data  # the bytes as they were, not re-encoded
        assert enc_l.name.endswith(os.path.relpath(folder.samples[i][0], tree))
        raw_f, raw_l = folder.load(i)[0], lmdb.load(i)[0]
        assert np.array_equal(np.asarray(raw_f), np.asarray(raw_l))
        assert torch.equal(transform(enc_f), transform(enc_l))

    # a second pack onto an existing file is refused unless forced
    again = run_cli("pack", tree, tmp_path / "out" / "set.lmdb", cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.slow
def test_interrupted_pack_leaves_no_complete_looking_file(tmp_path):
    tree = image_tree(tmp_path / "tree", per_class=3)
    os.mkfifo(tree / "fox" / "zz.jpg")  # reading it blocks forever: the pack stalls mid-way
    dst = tmp_path / "set.lmdb"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "pack", str(tree), str(dst)], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not any(p.startswith("set.lmdb.tmp-") for p in os.listdir(tmp_path)) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # let it write the records before the FIFO
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        assert proc.returncode != 0 and not dst.exists()
        tmps = sorted(p for p in os.listdir(tmp_path) if p.startswith("set.lmdb.tmp-"))
        if sig == signal.SIGKILL:  # no chance to clean up: a tmp name remains, and is refused as a pack
            assert len(tmps) == 1
            with pytest.raises(ConfigError, match="not a complete pack"):
                LmdbImages(str(tmp_path / tmps[0]))
            stale = tmps[0]
        else:  # SIGTERM unwinds and removes its own tmp
            assert tmps == [stale]

    os.unlink(tree / "fox" / "zz.jpg")
    pack(tree, dst, progress=False)  # a fresh tmp name: the stale one is neither reused nor taken for DST
    assert len(LmdbImages(str(dst))) == 9
    assert (tmp_path / stale).exists()


def test_lmdb_source_needs_a_path_and_a_pack(tmp_path):
    with pytest.raises(ConfigError, match="data.path is not set: source=lmdb"):
        build_loaders(DataConfig(source="lmdb"), micro_batch=2, seed=0, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="does not exist"):
        LmdbImages(str(tmp_path / "missing.lmdb"))
    (tmp_path / "text.lmdb").write_text("not a database")
    with pytest.raises(ConfigError, match="not an LMDB file|not a complete pack"):
        LmdbImages(str(tmp_path / "text.lmdb"))


# -- distributed: the LMDB source through the same samplers

def test_two_ranks_on_lmdb_get_disjoint_reshuffled_shards_and_exact_validation(tmp_path):
    tree = image_tree(tmp_path / "tree", per_class=7, size=(24, 20))  # 21 images: 16 train, 5 val
    lmdb_cfg = DataConfig(source="lmdb", path=str(packed(tmp_path, tree)), image_size=8, val_fraction=0.25)
    folder_cfg = DataConfig(source="imagefolder", path=str(tree), image_size=8, val_fraction=0.25)

    def shards(epoch):
        out = []
        for rank in range(2):
            loaders = build_loaders(lmdb_cfg, micro_batch=2, seed=0, rank=rank, world_size=2)
            loaders.start_epoch(epoch)
            out.append(list(loaders.train_sampler))
        return out

    (a0, b0), (a1, b1) = shards(0), shards(1)
    assert not set(a0) & set(b0) and sorted(a0 + b0) == list(range(16))
    assert not set(a1) & set(b1) and sorted(a1 + b1) == list(range(16))
    assert a0 != a1  # reshuffled per epoch

    for world in (2, 3, 4):  # 5 validation images: no world size here divides them
        lmdb_images, folder_images = [], []
        for rank in range(world):
            lmdb_images += [x for batch, _ in build_loaders(lmdb_cfg, 2, 0, rank, world).val for x in batch]
            folder_images += [x for batch, _ in build_loaders(folder_cfg, 2, 0, rank, world).val for x in batch]
        assert len(lmdb_images) == 5 and len({tuple(x.flatten().tolist()) for x in lmdb_images}) == 5
        assert all(torch.equal(a, b) for a, b in zip(lmdb_images, folder_images))  # the same images as the tree


# -- reduced-size decode: same crop boxes, nearly the same pixels

def test_draft_decode_keeps_the_crop_distribution_and_the_pixels(tmp_path):
    encoded = []
    for k in range(6):
        buf = io.BytesIO()
        smooth_image(640, 480, seed=k).save(buf, format="JPEG", quality=90)
        encoded.append(EncodedImage(buf.getvalue(), f"{k}.jpg"))
    size = 64
    crop = dict(size=size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=T.InterpolationMode.BICUBIC,
                antialias=True)
    draft, full, reference = DecodeRandomResizedCrop(**crop, draft=True), DecodeRandomResizedCrop(**crop, draft=False), \
        T.RandomResizedCrop(**crop)
    diffs, ref_diffs, reduced = [], [], 0
    for k, image in enumerate(encoded):
        decoded = Image.open(io.BytesIO(image.data)).convert("RGB")
        for seed in range(8):
            with seeded(100 * k + seed):
                out_draft, box_draft = draft.crop_encoded(image)
            with seeded(100 * k + seed):
                out_full, box_full = full.crop_encoded(image)
            with seeded(100 * k + seed):  # torchvision's draws on the decoded image
                box_ref = reference.make_params([decoded])
                out_ref = T.PILToTensor()(reference.transform(decoded, box_ref))
            assert box_draft == box_full == box_ref  # same boxes, in original coordinates
            assert out_draft.shape == out_full.shape == (3, size, size)
            reduced += draft_scale_for(box_ref["width"], box_ref["height"], size, size) > 1
            diffs.append((out_draft.float() - out_full.float()).abs().mean().item())
            ref_diffs.append((out_full.float() - out_ref.float()).abs().mean().item())
    assert reduced >= 40  # of 48 crops: the test exercises the reduced decode
    assert np.mean(diffs) < 3 and max(diffs) < 6  # in 0..255 units
    assert np.mean(ref_diffs) < 0.5  # our tensor resize is torchvision's PIL crop-and-resize, to rounding

    # eval: drafted to at least the resize target, same output size as the full decode
    resize = dict(size=[73], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    for image in encoded[:3]:
        out_draft, out_full = DecodeResize(**resize, draft=True)(image), DecodeResize(**resize, draft=False)(image)
        assert out_draft.shape == out_full.shape == (3, 73, 97)
        assert (out_draft.float() - out_full.float()).abs().mean() < 3


def test_tf_fast_idct_is_the_default_and_stays_close_to_pils(tmp_path):
    assert DataConfig().jpeg_dct == "fast"  # TF's decode_jpeg default (JDCT_IFAST), so the recipe's pixels
    crop = dict(size=96, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=T.InterpolationMode.BICUBIC,
                antialias=True, draft=False)
    fast, accurate = DecodeRandomResizedCrop(**crop, fast_dct=True), DecodeRandomResizedCrop(**crop, fast_dct=False)
    diffs = []
    for k in range(4):
        buf = io.BytesIO()
        smooth_image(320, 240, seed=k).save(buf, format="JPEG", quality=90)
        image = EncodedImage(buf.getvalue(), f"{k}.jpg")
        for seed in range(4):
            with seeded(seed):
                out_fast, box_fast = fast.crop_encoded(image)
            with seeded(seed):
                out_accurate, box_accurate = accurate.crop_encoded(image)
            assert box_fast == box_accurate
            diffs.append((out_fast.float() - out_accurate.float()).abs())
    assert 0 < np.mean([d.mean().item() for d in diffs]) < 1  # another IDCT, within rounding of the image
    assert max(d.max().item() for d in diffs) <= 8


def test_batches_cross_in_channels_last_memory_and_normalize_to_either_layout(tmp_path):
    tree = image_tree(tmp_path / "tree", per_class=6, size=(64, 48))
    cfg = DataConfig(source="imagefolder", path=str(tree), image_size=32, val_fraction=0.5, num_workers=1)
    loaders = build_loaders(cfg, micro_batch=4, seed=0, rank=0, world_size=1)
    loaders.start_epoch(0)
    images, labels = next(iter(loaders.train))  # from a worker process
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last)
    dataset, order = loaders.train.dataset, list(loaders.train_sampler)[:4]
    assert torch.equal(images, torch.stack([dataset[i][0] for i in order]))  # the same samples, any layout
    assert labels.tolist() == [dataset[i][1] for i in order]
    planar, nhwc = normalize(images, "cpu"), normalize(images, "cpu", channels_last=True)
    assert planar.is_contiguous() and nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(planar, nhwc) and torch.equal(planar, normalize(images.contiguous(), "cpu"))


# -- corrupt files: reported once each, replaced, counted; the epoch goes on

def test_corrupt_files_are_replaced_reported_once_and_counted(tmp_path, capfd):
    tree, bad = corrupt_tree(tmp_path / "tree")
    loaders = build_loaders(DataConfig(source="imagefolder", path=str(tree), image_size=8, val_fraction=0.5,
                                       num_workers=1), micro_batch=2, seed=0, rank=0, world_size=1)
    for epoch in range(2):
        loaders.start_epoch(epoch)
        assert sum(len(x) for x, _ in loaders.train) == 8 and sum(len(x) for x, _ in loaders.val) == 9
    err = capfd.readouterr().err
    assert all(err.count(path) == 1 for path in bad), err  # once per file, whatever the worker or epoch
    source = loaders.train.dataset.images
    assert sorted(source.name(i) for i in loaders.corrupt_indices()) == sorted(bad)  # found in the workers, read here


def test_a_tree_with_corrupt_files_trains_through_an_epoch(tmp_path):
    tree, bad = corrupt_tree(tmp_path / "tree")  # 18 files: 14 train, 4 val
    result = run_cli("train", "--recipe", "cifar10", "--run-dir", "run", f"data.path={tree}", *TINY,
                     "train.micro_batch=7", "train.epochs=1", "data.val_fraction=0.2", "data.num_workers=1",
                     "data.image_size=16", "train.log_every_steps=1", "wandb.mode=disabled", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(result.stderr.count(path) == 1 for path in bad), result.stderr[-3000:]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # the whole epoch
    assert all("corrupt_images" in r for r in rows if "loss" in r)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["corrupt_images"] == 2


def test_a_resumed_run_counts_on_the_corrupt_files_it_found_and_does_not_report_them_again(tmp_path):
    tree, bad = corrupt_tree(tmp_path / "tree")  # 14 train, 4 val: 2 steps an epoch, eval at its end
    args = ["train", "--recipe", "cifar10", "--run-dir", "run", f"data.path={tree}", *TINY, "train.micro_batch=7",
            "train.epochs=2", "data.val_fraction=0.2", "data.num_workers=1", "data.image_size=16",
            "wandb.mode=disabled"]
    first = run_cli(*args, "--stop-at-step", "2", cwd=tmp_path)
    assert first.returncode == 0 and all(first.stderr.count(path) == 1 for path in bad), first.stderr[-3000:]
    second = run_cli(*args, "--resume", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not any(path in second.stderr for path in bad), second.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["corrupt_images"] == 2


# -- end to end on a pack, and the bench

def test_train_on_an_lmdb_pack(tmp_path):
    dst = packed(tmp_path, image_tree(tmp_path / "tree", per_class=8, size=(24, 20)))
    result = run_cli("train", "--recipe", "demo", "--run-dir", "run", "data.source=lmdb", f"data.path={dst}", *TINY,
                     "train.micro_batch=4", "train.max_steps=3", "train.log_every_steps=1", "wandb.mode=disabled",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3 and summary["corrupt_images"] == 0
    assert summary["final"]["val_images"] == 5  # 20% of 24


def test_bench_data_prints_the_baseline_and_ours(tmp_path):
    tree = image_tree(tmp_path / "tree", per_class=4, size=(64, 48))
    result = run_cli("bench", "data", "--source", tree, "--workers", "0", "--images", "8", "--image-size", "32",
                     "--repeats", "1", "--auto-augment", "v0", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "32 px training transforms with AutoAugment v0" in lines[0]
    assert any(line.startswith("torchvision ImageFolder, full decode") and line.endswith("1.00x") for line in lines)
    for ours in ("trainer imagefolder, jpeg_draft=true jpeg_dct=fast", "trainer imagefolder, pipeline=tf"):
        assert any(line.startswith(ours) and line.endswith("x") for line in lines)

    from trainer.tools.bench_data import bench_data

    rows = bench_data(str(packed(tmp_path, tree)), workers=0, images=8, image_size=32, repeats=1)
    assert [r["loader"].split(",")[0] for r in rows] == ["PIL full decode of the LMDB bytes + torchvision transforms",
                                                          "trainer lmdb", "trainer lmdb", "trainer lmdb", "trainer lmdb"]
    assert all(r["images_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("option, message", [(["--auto-augment", "v9"], "config key 'auto_augment'"),
                                             (["--image-size", "4"], "config key 'image_size'")])
def test_bench_data_refuses_a_bad_setting_on_one_line(tmp_path, option, message):
    tree = image_tree(tmp_path / "tree", per_class=2)
    result = run_cli("bench", "data", "--source", tree, *option, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: bench data: {message}")
