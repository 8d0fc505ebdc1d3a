"""Write what TensorFlow itself computes for the TF EfficientNet input pipeline and schedule, as small
fixtures that tests/test_tf_pipeline.py pins trainer/data/tf_pipeline.py and trainer/optim.py to.

Runs with TensorFlow (CPU) in its own virtual environment, never the project's: `make tf-fixtures`
builds it and runs this. The tests read the files it writes and never need TensorFlow.

    python make_fixtures.py --photo PATH/TO/china.jpg [--out tests/tf_fixtures]

`--photo` is scikit-learn's sample photo china.jpg (CC BY 2.0, danielbuechele on Flickr; it ships
inside scikit-learn, so the Makefile finds it there): a 160x120 crop of it, re-encoded, is the real
photo the resize and decode fixtures run on.

What each fixture is, with the TF call that made it:
- crop draws: `tf.image.stateless_sample_distorted_bounding_box` (the kernel behind
  tf.image.sample_distorted_bounding_box) with the training crop's arguments, 4,000 draws for each
  of three image sizes;
- center crop boxes: the eval crop's arithmetic, in TF's dtypes (a float32 product cast to int32);
- resize: `tf.compat.v1.image.resize_bicubic` (the legacy kernel the recipe's preprocessing calls),
  float32 outputs, upsampling and downsampling, on the photo and on noise;
- decode: `tf.io.decode_jpeg` and `tf.io.decode_and_crop_jpeg` with their default IDCT, then the
  train path (crop window -> resize) and the eval path (center crop -> resize) end to end;
- posterize: the AutoAugment op's right shift then left shift on uint8, for 0 to 8 bits kept;
- lr schedule: tf.compat.v1.train.exponential_decay (staircase) with the linear warmup, for the B0
  recipe at 1,281,167 images and batch 2048, at every step.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

TRAIN_CROP = dict(min_object_covered=0.1, aspect_ratio_range=(3.0 / 4, 4.0 / 3), area_range=(0.08, 1.0),
                  max_attempts=10, use_image_if_no_bounding_boxes=True)
CROP_SIZES = {"500x375": (375, 500), "375x500": (500, 375), "224x224": (224, 224)}  # name (W x H): (H, W)
DRAWS = 4000
DEGENERATE_SIZES = [(1, 1), (3, 200), (200, 3), (5, 8), (10, 10)]  # (H, W)
DEGENERATE_DRAWS = 500
PHOTO_WINDOW = (150, 200, 120, 160)  # top, left, height, width of the photo crop the fixtures use
EFFICIENTNET_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)  # B0 ... B7


def crop_draws() -> dict:
    """(top, left, height, width) of every draw, and the statistics the tests compare with; a few
    degenerate sizes (where attempts fail and the op returns the whole image) with fewer draws."""
    whole = tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32)
    arrays, stats = {}, {}
    sizes = [(name, shape, DRAWS) for name, shape in CROP_SIZES.items()]
    sizes += [(f"{w}x{h}", (h, w), DEGENERATE_DRAWS) for h, w in DEGENERATE_SIZES]
    for index, (name, (height, width), draws) in enumerate(sizes):
        rows = []
        for draw in range(draws):
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                [height, width, 3], whole, seed=[draw, index], **TRAIN_CROP)
            rows.append([int(begin[0]), int(begin[1]), int(size[0]), int(size[1])])
        boxes = np.array(rows, np.int16)
        top, left, h, w = (boxes[:, i].astype(np.int64) for i in range(4))
        area = h * w / (height * width)
        fallback = (h == height) & (w == width)
        aspect = w / h
        stats[name] = {
            "height": height, "width": width, "draws": draws,
            "mean_area": float(area.mean()), "std_area": float(area.std(ddof=1)),
            "under_10pct": float((area < 0.1).mean()), "fallback_rate": float(fallback.mean()),
            "aspect_quantiles": {str(q): float(np.quantile(aspect, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
            # the kernel draws the offset in [0, size - crop): a crop shorter than the image never touches its end
            "touches_bottom_when_shorter": int(((top + h == height) & (h < height)).sum()),
            "touches_right_when_narrower": int(((left + w == width) & (w < width)).sum()),
        }
        arrays[f"crop_draws_{name}"] = boxes
    return {"arrays": arrays, "stats": stats}


def center_crop(height: int, width: int, image_size: int, padding: int) -> tuple[int, int, int]:
    """(offset_height, offset_width, size) of preprocessing.py's `_decode_and_center_crop`, with TF's
    dtypes: the Python ratio becomes a float32 constant, the product is cast to int32."""
    h, w = tf.constant(height, tf.int32), tf.constant(width, tf.int32)
    size = tf.cast((image_size / (image_size + padding)) * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    return int(((h - size) + 1) // 2), int(((w - size) + 1) // 2), int(size)


def center_crop_boxes() -> list[list[int]]:
    """[height, width, image_size, crop_padding, offset_height, offset_width, crop_size] rows: B0-B7's
    sizes (and 96), both paddings, ImageNet-like and random image shapes."""
    rng = np.random.default_rng(0)
    shapes = [(375, 500), (500, 375), (333, 500), (480, 640), (224, 224), (256, 256), (120, 160), (1, 1)]
    shapes += [tuple(int(v) for v in rng.integers(16, 2500, size=2)) for _ in range(60)]
    rows = []
    for image_size in EFFICIENTNET_SIZES + (96,):
        # the published checkpoints' code: crop_padding 32; today's: round(image_size * (1 / 0.875 - 1))
        for padding in sorted({32, round(image_size * (1 / 0.875 - 1))}):
            for height, width in shapes:
                rows.append([height, width, image_size, padding, *center_crop(height, width, image_size, padding)])
    return rows


def resize_bicubic(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """The recipe's resize: tf.compat.v1 resize_bicubic with its defaults (no align_corners, no half-pixel centers)."""
    return tf.compat.v1.image.resize_bicubic(image[None], [out_h, out_w])[0].numpy()


def photo_jpeg(path: Path) -> bytes:
    """A 160x120 crop of the photo, re-encoded by TF at quality 90 (the fixture's own JPEG, a few KB)."""
    top, left, height, width = PHOTO_WINDOW
    image = tf.io.decode_jpeg(tf.io.read_file(str(path)), channels=3)[top:top + height, left:left + width]
    return tf.io.encode_jpeg(image, quality=90).numpy()


def resize_cases(photo: np.ndarray) -> dict:
    """TF's float32 outputs, upsampling, downsampling, a non-square output and the same size, from
    windows of the decoded photo (stored as the window: the test slices the same decode) and noise."""
    noise = np.random.default_rng(1).integers(0, 256, size=(150, 97, 3), dtype=np.uint8)
    windows = {  # name: (top, left, height, width), out_h, out_w
        "photo_up": ((0, 0, 37, 31), 48, 48),
        "photo_down": ((0, 0, 120, 160), 40, 40),
        "photo_mild_down": ((10, 20, 55, 61), 48, 48),
        "photo_nonsquare": ((5, 7, 95, 53), 32, 64),
        "photo_same": ((0, 0, 48, 48), 48, 48),
    }
    arrays = {"resize_noise": noise}
    for name, ((top, left, height, width), out_h, out_w) in windows.items():
        arrays[f"resize_{name}_window"] = np.array([top, left, height, width], np.int32)
        arrays[f"resize_{name}_out"] = resize_bicubic(photo[top:top + height, left:left + width], out_h, out_w)
    arrays["resize_noise_down_out"] = resize_bicubic(noise, 48, 48)
    arrays["resize_noise_up_out"] = resize_bicubic(noise[:29, :35], 48, 48)
    return arrays


def decode_cases(jpeg: bytes) -> tuple[dict, dict]:
    """TF's decode, its crop-window decode, and the train and eval paths end to end on the JPEG."""
    contents = tf.constant(jpeg)
    full = tf.io.decode_jpeg(contents, channels=3).numpy()
    arrays = {"jpeg": np.frombuffer(jpeg, np.uint8), "decode_full": full}
    info = {}
    windows = {"down": (10, 20, 100, 120, 48), "up": (50, 60, 30, 40, 48)}
    for name, (top, left, height, width, size) in windows.items():
        crop = tf.io.decode_and_crop_jpeg(contents, [top, left, height, width], channels=3).numpy()
        info[f"decode_and_crop_{name}_equals_sliced_full_decode"] = bool(
            np.array_equal(crop, full[top:top + height, left:left + width]))
        info[f"decode_and_crop_{name}_max_diff_to_sliced"] = int(
            np.abs(crop.astype(int) - full[top:top + height, left:left + width]).max())
        arrays[f"train_{name}_window"] = np.array([top, left, height, width, size], np.int32)
        arrays[f"train_{name}_out"] = resize_bicubic(crop, size, size)
    for image_size, padding in ((56, 32), (48, round(48 * (1 / 0.875 - 1)))):
        top, left, size = center_crop(*full.shape[:2], image_size, padding)
        crop = tf.io.decode_and_crop_jpeg(contents, [top, left, size, size], channels=3).numpy()
        arrays[f"eval_{image_size}_pad{padding}_out"] = resize_bicubic(crop, image_size, image_size)
    return arrays, info


def posterize() -> dict:
    """AutoAugment's posterize (shift = 8 - bits, right then left shift on uint8) for 0..8 bits kept,
    on every uint8 value; also what XLA makes of 0 bits (not the input pipeline's kernel: tf.data
    runs the CPU kernels, on the TPU host too)."""
    values = tf.constant(np.arange(256, dtype=np.uint8))

    def op(image, bits):
        shift = tf.cast(8 - bits, image.dtype)
        return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)

    outputs = np.stack([op(values, bits).numpy() for bits in range(9)])
    xla = tf.function(op, jit_compile=True)(values, tf.constant(0, tf.int32)).numpy()
    return {"arrays": {"posterize_values": np.arange(256, dtype=np.uint8), "posterize_out": outputs},
            "xla_bits0_distinct_values": sorted(set(xla.tolist()))}


def lr_schedule() -> dict:
    """The B0 recipe's lr at every step: 0.016 x batch / 256, a linear warmup over 5 epochs, then
    lr x 0.97^floor(step / (2.4 epochs of steps)) counted from step 0; steps_per_epoch is the float
    num_train_images / batch, as main.py passes it."""
    images, batch, base_lr, epochs = 1281167, 2048, 0.016, 350
    steps_per_epoch = images / batch
    initial_lr = base_lr * (batch / 256.0)
    warmup_steps = int(5 * steps_per_epoch)
    decay_steps = steps_per_epoch * 2.4
    train_steps = int(epochs * steps_per_epoch)  # main.py's default --train_steps is this number
    step = tf.range(train_steps + 1, dtype=tf.int64)
    decayed = tf.compat.v1.train.exponential_decay(initial_lr, step, decay_steps, 0.97, staircase=True)
    decayed = decayed() if callable(decayed) else decayed  # eager mode hands back a function
    warmup = initial_lr * tf.cast(step, tf.float32) / tf.cast(warmup_steps, tf.float32)
    lr = tf.where(step < warmup_steps, warmup, decayed).numpy()
    stair_starts = [int(s) for s in np.nonzero(np.diff(lr[warmup_steps:]) != 0)[0] + warmup_steps + 1]
    picks = sorted({0, 1, 2, 1000, warmup_steps - 1, warmup_steps, warmup_steps + 1, train_steps - 1, train_steps,
                    *stair_starts, *(s - 1 for s in stair_starts)})
    return {"num_train_images": images, "train_batch_size": batch, "base_lr": base_lr, "epochs": epochs,
            "steps_per_epoch": steps_per_epoch, "initial_lr": initial_lr, "warmup_steps": warmup_steps,
            "decay_steps": decay_steps, "train_steps": train_steps, "stair_starts": stair_starts,
            "steps": picks, "lr": [float(lr[s]) for s in picks]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, required=True, help="scikit-learn's china.jpg")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    tf.random.set_seed(0)

    jpeg = photo_jpeg(args.photo)
    decode_arrays, decode_info = decode_cases(jpeg)
    crops, posterized = crop_draws(), posterize()
    arrays = {**crops["arrays"], **resize_cases(decode_arrays["decode_full"]), **decode_arrays,
              **posterized["arrays"], "center_crop_boxes": np.array(center_crop_boxes(), np.int32)}
    summary = {
        "tensorflow": tf.__version__,
        "photo": "160x120 crop of scikit-learn's china.jpg (CC BY 2.0, danielbuechele on Flickr), TF JPEG q90",
        "train_crop_arguments": TRAIN_CROP,
        "crop_stats": crops["stats"],
        "decode": decode_info,
        "posterize_xla_bits0_distinct_values": posterized["xla_bits0_distinct_values"],
        "lr_schedule": lr_schedule(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "tf_arrays.npz", **arrays)
    (args.out / "tf_values.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, stats in summary["crop_stats"].items():
        print(f"{name}: mean area {stats['mean_area']:.4f}, under 10% {stats['under_10pct']:.4f}, "
              f"fallback {stats['fallback_rate']:.4f}")
    lr = summary["lr_schedule"]
    print(f"lr: steps/epoch {lr['steps_per_epoch']:.4f}, warmup {lr['warmup_steps']}, decay every "
          f"{lr['decay_steps']:.4f} steps, {lr['train_steps']} steps, {len(lr['stair_starts'])} stairs after warmup")
    print(f"decode: {decode_info}; posterize 0 bits under XLA: {summary['posterize_xla_bits0_distinct_values']}")


if __name__ == "__main__":
    main()
