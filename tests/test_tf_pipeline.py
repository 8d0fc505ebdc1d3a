"""trainer/data/tf_pipeline.py and the TF recipe's lr schedule against what TensorFlow itself computed
(tests/tf_fixtures, written by `make tf-fixtures`; no TensorFlow needed here)."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import ScheduleConfig
from trainer.data.decode import EncodedImage, decode_pixels
from trainer.optim import LRSchedule
from trainer.data.tf_pipeline import (TFCenterCrop, TFRandomCrop, crop_padding_for_fraction, tf_center_crop_box,
                                 tf_posterize, tf_resize_bicubic, tf_resize_bicubic_float,
                                 tf_sample_distorted_bounding_box, tf_train_crop_box)

FIXTURES = Path(__file__).parent / "tf_fixtures"
TF = json.loads((FIXTURES / "tf_values.json").read_text())
ARRAYS = np.load(FIXTURES / "tf_arrays.npz")
OUR_DRAWS = 8000
SIGMAS = 4  # sampling-error bound: a correct sampler fails a comparison about once in 16,000


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def our_draws(height: int, width: int, count: int, seed: int = 0) -> np.ndarray:
    """(top, left, height, width) rows; the whole image where every attempt failed, as TF's op returns."""
    rng = random.Random(seed)
    return np.array([tf_sample_distorted_bounding_box(height, width, rng) or (0, 0, height, width)
                     for _ in range(count)])


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance between the empirical distributions of a and b."""
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_bound(n: int, m: int, alpha: float = 1e-4) -> float:
    """The distance two samples of one distribution exceed with probability about alpha."""
    return float(np.sqrt(-np.log(alpha / 2) / 2 * (n + m) / (n * m)))


# -- the train crop: sample_distorted_bounding_box

@pytest.mark.parametrize("name", ["500x375", "375x500", "224x224"])
def test_crop_distribution_matches_tf(name):
    stats, tf_boxes = TF["crop_stats"][name], ARRAYS[f"crop_draws_{name}"].astype(np.int64)
    height, width = stats["height"], stats["width"]
    ours = our_draws(height, width, OUR_DRAWS)
    tf_area, area = (b[:, 2] * b[:, 3] / (height * width) for b in (tf_boxes, ours))
    # mean area within SIGMAS standard errors of the difference of two sample means
    standard_error = np.sqrt(tf_area.var(ddof=1) / len(tf_area) + area.var(ddof=1) / len(area))
    assert abs(area.mean() - stats["mean_area"]) < SIGMAS * standard_error
    # TF keeps no crop under 10% (min_object_covered=0.1 on the whole image), nor do we
    assert stats["under_10pct"] == 0 and (area < 0.1).sum() == 0
    # whole distributions: area, aspect ratio, crop height, offsets (TF's never reach the image's end)
    for column in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 3] / b[:, 2], lambda b: b[:, 2], lambda b: b[:, 0]):
        assert ks_statistic(column(ours), column(tf_boxes)) < ks_bound(len(ours), len(tf_boxes))
    shorter = ours[:, 2] < height
    assert not np.any(ours[shorter, 0] + ours[shorter, 2] == height)
    assert stats["touches_bottom_when_shorter"] == 0 and stats["touches_right_when_narrower"] == 0


@pytest.mark.parametrize("name", ["1x1", "200x3", "3x200", "8x5", "10x10"])
def test_crop_failures_match_tf_on_tiny_images(name):
    """Images where attempts fail: TF's op returns the whole image as often as ours returns None."""
    stats = TF["crop_stats"][name]
    height, width, draws = stats["height"], stats["width"], stats["draws"]
    ours = our_draws(height, width, draws)
    fallback = float(np.mean((ours[:, 2] == height) & (ours[:, 3] == width)))
    p = max(stats["fallback_rate"], 1 / draws)
    assert abs(fallback - stats["fallback_rate"]) <= SIGMAS * np.sqrt(2 * p * (1 - p) / draws) + 1e-12


def test_train_crop_falls_back_to_the_eval_crop():
    # every attempt fails on a 3x200 image: TF takes the center crop (with crop padding 32)
    assert tf_sample_distorted_bounding_box(3, 200, random.Random(0)) is None
    assert tf_train_crop_box(3, 200, 224, random.Random(0)) == tf_center_crop_box(3, 200, 224) == (1, 99, 2, 2)
    # a grayscale JPEG's shape has 1 channel: `_at_least_x_are_equal(shape, crop shape, 3)` fails, no fallback
    assert tf_train_crop_box(3, 200, 224, random.Random(0), channels=1) == (0, 0, 3, 200)


# -- the eval crop

def test_center_crop_box_matches_tf():
    rows = ARRAYS["center_crop_boxes"]
    assert len(rows) > 1000
    for height, width, image_size, padding, top, left, size in rows.tolist():
        assert tf_center_crop_box(height, width, image_size, padding) == (top, left, size, size)


def test_crop_padding_of_tfs_current_code():
    # TF's code today: round(image_size * (1 / 0.875 - 1)); the published checkpoints' code: 32
    assert [crop_padding_for_fraction(s) for s in (224, 240, 260, 300, 380, 456, 528, 600)] == \
        [32, 34, 37, 43, 54, 65, 75, 86]
    paddings = {(int(s), int(p)) for s, p in ARRAYS["center_crop_boxes"][:, 2:4]}
    assert all(p in (32, crop_padding_for_fraction(s)) for s, p in paddings)


# -- the resize: legacy resize_bicubic

RESIZE_CASES = ["photo_up", "photo_down", "photo_mild_down", "photo_nonsquare", "photo_same", "noise_down", "noise_up"]


def resize_case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 input, TF's float32 output), both (3, H, W)."""
    if name.startswith("photo"):
        top, left, height, width = ARRAYS[f"resize_{name}_window"].tolist()
        image = ARRAYS["decode_full"][top:top + height, left:left + width]
    else:
        image = ARRAYS["resize_noise"] if name == "noise_down" else ARRAYS["resize_noise"][:29, :35]
    return chw(image), chw(ARRAYS[f"resize_{name}_out"])


@pytest.mark.parametrize("name", RESIZE_CASES)
def test_float_resize_is_tfs(name):
    image, expected = resize_case(name)
    assert torch.allclose(tf_resize_bicubic_float(image, *expected.shape[1:]), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", RESIZE_CASES)
def test_fast_resize_is_within_a_level_of_tf_but_at_saturated_edges(name):
    """The uint8 path: within 1/255 of TF (rounded, clipped) on at least 97% of pixels of these
    high-contrast crops (0.12% of pixels are further on 224 px crops of whole photos): the rest sit
    next to saturated edges, where torch clips its intermediate image (noise is all such edges)."""
    image, expected = resize_case(name)
    out = tf_resize_bicubic(image, *expected.shape[1:])
    assert out.dtype == torch.uint8 and out.shape == expected.shape
    assert out.permute(1, 2, 0).is_contiguous()  # channels-last, as the loader collates it
    diff = (out.float() - expected.round().clamp(0, 255)).abs()
    assert (diff <= 1).float().mean() >= (0.97 if name.startswith("photo") else 0.95)
    assert diff.max() <= 25
    if name == "photo_same":
        assert torch.equal(out, image)


def test_fast_resize_matches_the_float_one_without_saturated_edges():
    """Away from 0 and 255 nothing clips; only rounding (and, upsampling, the first and last output
    rows and columns, where torch drops a tap TF clamps) separates the two."""
    y, x = torch.meshgrid(torch.arange(90.0), torch.arange(70.0), indexing="ij")
    smooth = 128 + 60 * torch.sin(x / 5) * torch.cos(y / 7)
    image = torch.stack([smooth, smooth.flip(0), smooth.flip(1)]).round().to(torch.uint8)
    for out_h, out_w in ((48, 40), (130, 110)):
        exact = tf_resize_bicubic_float(image, out_h, out_w).round()
        diff = (tf_resize_bicubic(image, out_h, out_w).float() - exact).abs()
        assert diff.max() <= 1


# -- decode and the transforms, end to end

def jpeg() -> bytes:
    return ARRAYS["jpeg"].tobytes()


def test_decode_is_tfs():
    """TF's decode_jpeg (libjpeg's fast integer IDCT) and ours give the same pixels."""
    pixels, factor = decode_pixels(jpeg(), 1, fast_dct=True)
    assert factor == 1.0 and torch.equal(pixels, chw(ARRAYS["decode_full"]))


@pytest.mark.parametrize("image_size, padding", [(56, 32), (48, 7)])
def test_eval_crop_transform_matches_tf(image_size, padding):
    expected = chw(ARRAYS[f"eval_{image_size}_pad{padding}_out"]).round().clamp(0, 255)
    for image in (EncodedImage(jpeg(), "fixture"), chw(ARRAYS["decode_full"])):
        out = TFCenterCrop(image_size, crop_padding=padding)(image)
        # TF decodes only the window: its first and last columns' chroma differ (see the module doc)
        diff = (out.float() - expected).abs()[:, :, 2:-2]
        assert (diff <= 1).float().mean() >= 0.97 and diff.max() <= 25


@pytest.mark.parametrize("name", ["down", "up"])
def test_train_crop_and_resize_match_tf(name):
    top, left, height, width, size = ARRAYS[f"train_{name}_window"].tolist()
    pixels = chw(ARRAYS["decode_full"])
    out = tf_resize_bicubic(pixels[:, top:top + height, left:left + width], size, size)
    diff = (out.float() - chw(ARRAYS[f"train_{name}_out"]).round().clamp(0, 255)).abs()[:, :, 2:-2]
    assert (diff <= 1).float().mean() >= 0.97 and diff.max() <= 25


def test_random_crop_transform_draws_tfs_box():
    """TFRandomCrop on file bytes, a PIL image and a tensor: the box tf_train_crop_box draws from the
    `random` module (which the loader seeds per sample), resized to image_size."""
    pixels = chw(ARRAYS["decode_full"])
    inputs = (EncodedImage(jpeg(), "fixture"), Image.fromarray(ARRAYS["decode_full"]), pixels)
    for image in inputs:
        random.seed(3)
        out = TFRandomCrop(40)(image)
        random.seed(3)
        top, left, height, width = tf_train_crop_box(120, 160, 40)
        assert torch.equal(out, tf_resize_bicubic(pixels[:, top:top + height, left:left + width], 40, 40))
        assert out.shape == (3, 40, 40) and out.permute(1, 2, 0).is_contiguous()


# -- AutoAugment's posterize

def test_posterize_is_tfs_including_zero_bits():
    values, expected = ARRAYS["posterize_values"], ARRAYS["posterize_out"]
    for bits in range(9):
        assert np.array_equal(tf_posterize(torch.from_numpy(values), bits).numpy(), expected[bits])
        image = Image.fromarray(np.stack([values] * 3, axis=-1).reshape(16, 16, 3))
        assert np.array_equal(np.array(tf_posterize(image, bits))[..., 0].ravel(), expected[bits])
    assert sorted(set(expected[0].tolist())) == [0, 128]  # 0 bits: TF's shift of 8 is clamped to 7


# -- the lr schedule

def test_lr_schedule_is_tfs_with_fractional_steps_per_epoch():
    """LRSchedule given TF's float steps per epoch (1,281,167 / 2048) gives TF's lr on both sides of
    every stair but one. TF's exponential_decay divides in float32: 0.97 is 0.97000003 there (by the
    145th stair its lr is 4e-6 above the exact one, inside the tolerance), and where step / decay_steps
    falls within float32 rounding of a whole number its stair starts where float32 says, once here:
    the 117th at step 175,660, where LRSchedule's float64 starts it at 175,661."""
    tf = TF["lr_schedule"]
    assert tf["warmup_steps"] == 3127 and tf["train_steps"] == 218949 and len(tf["stair_starts"]) == 143
    assert tf["steps_per_epoch"] == 1281167 / 2048 and tf["decay_steps"] == 2.4 * 1281167 / 2048
    cfg = ScheduleConfig(name="tf_staircase", warmup_epochs=5, warmup_form="linear", warmup_start_lr=0.0,
                         warmup_in_decay_clock=True, decay_rate=0.97, decay_epochs=2.4)
    schedule = LRSchedule(cfg, peak=0.016 * 2048 / 256, steps_per_epoch=tf["steps_per_epoch"],
                          total_steps=tf["train_steps"])
    assert schedule.warmup_steps == tf["warmup_steps"]
    assert len(tf["steps"]) > 2 * len(tf["stair_starts"])  # both sides of every stair
    decay32 = np.float32(tf["decay_steps"])
    float32_stair = [int(np.floor(np.float32(step) / decay32)) != int(np.floor(step / tf["decay_steps"]))
                     for step in tf["steps"]]
    differ = [step for step, lr in zip(tf["steps"], tf["lr"]) if schedule(step) != pytest.approx(lr, rel=1e-5)]
    assert differ == [step for step, moved in zip(tf["steps"], float32_stair) if moved and step >= 3127]
    assert differ == [175660]
    assert schedule(175661) == pytest.approx(tf["lr"][tf["steps"].index(175660)], rel=1e-5)
