"""TensorFlow's EfficientNet input pipeline (tensorflow/tpu's preprocessing.py and autoaugment.py),
reproduced: its random crop sampler, its fallback, its eval crop, its legacy bicubic resize and its
posterize, and two transforms built from them.

What TF does, and where ours differs from torchvision's and from the rest of this package:
- Train crop: `tf.image.sample_distorted_bounding_box` draws the crop's HEIGHT uniformly (not its
  area, as torchvision), so crops are smaller on average (mean area 0.39 of a 500x375 image against
  torchvision's 0.435), and `min_object_covered=0.1` rejects every crop under 10% of the image
  (torchvision keeps its 8-10% ones). When all 10 attempts fail, or the crop is the whole image, TF
  takes the eval center crop instead.
- Eval crop: a square of image_size / (image_size + crop_padding) of the short side, centred, then
  resized: crop first, resize second (torchvision resizes the short side, then crops).
- Resize: `tf.compat.v1.image.resize_bicubic`, the legacy kernel: cubic a = -0.75, 4 taps whatever
  the scale (no antialiasing: a downsampled crop aliases), source pixel = destination * in / out
  (no half-pixel offset), border taps clamped. Its output is float; the recipe casts it to uint8
  only before AutoAugment.
- Decode: TF decodes just the crop window (`decode_and_crop_jpeg`), with libjpeg's fast integer IDCT.
  We decode the whole JPEG at full size with the same IDCT (identical pixels) and slice. The one
  difference: TF's window decode upsamples the chroma as if the window's first and last columns were
  the image's edge, so those two columns differ (by up to 13 levels on the test photo).
- Posterize: `posterize(image, 0)` shifts a uint8 by 8, which TF's CPU kernel clamps to 7: the image
  becomes {0, 128}, not black (AutoAugment v0's ('Posterize', 0.8, 2) keeps 0 bits).
"""
from __future__ import annotations

import functools
import random
from abc import abstractmethod

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image

from .decode import JPEG_MAGIC, EncodedImage, decode_pixels, image_size, raises_corrupt_image, to_tensor

f32 = np.float32  # TF's kernels compute the crop in float32: the same rounding at the same boundaries

# preprocessing.py's `_decode_and_random_crop` arguments
TRAIN_MIN_OBJECT_COVERED = 0.1
TRAIN_ASPECT_RATIO_RANGE = (3.0 / 4, 4.0 / 3)
TRAIN_AREA_RANGE = (0.08, 1.0)
TRAIN_MAX_ATTEMPTS = 10
# crop padding 32: the code that trained the published B0-B7 checkpoints; TF's code now derives the
# padding from a fixed crop fraction (see crop_padding_for_fraction): the same 32 at B0's 224
CROP_PADDING = 32


# -- the train crop: tf.image.sample_distorted_bounding_box

def _random_crop_once(height: int, width: int, min_area, max_area, aspect, rng) -> tuple[int, int, int, int] | None:
    """One attempt of TF's kernel (GenerateRandomCrop): the height uniform between the heights
    that give the min and max area at this aspect ratio, width = round(height x aspect), rounding
    nudged by a pixel when it leaves the area range; None when it still cannot fit."""
    crop_h = int(np.rint(np.sqrt(min_area / aspect)))  # lrintf: round half to even, as np.rint
    max_h = int(np.rint(np.sqrt(max_area / aspect)))
    if np.rint(f32(max_h) * aspect) > width:
        # the largest height whose rounded width still fits, computed in double as TF does
        max_h = int((width + 0.5 - float(f32(1e-7))) / float(aspect))
        if np.rint(f32(max_h) * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    crop_h = min(crop_h, max_h)
    if crop_h < max_h:
        crop_h += rng.randrange(max_h - crop_h + 1)
    crop_w = int(np.rint(f32(crop_h) * aspect))
    area = f32(crop_w * crop_h)
    if area < min_area:
        crop_h += 1
        crop_w = int(np.rint(f32(crop_h) * aspect))
        area = f32(crop_w * crop_h)
    if area > max_area:
        crop_h -= 1
        crop_w = int(np.rint(f32(crop_h) * aspect))
        area = f32(crop_w * crop_h)
    if area < min_area or area > max_area or crop_w > width or crop_h > height or crop_w <= 0 or crop_h <= 0:
        return None
    # TF draws the offset in [0, size - crop): a crop shorter than the image never reaches its last row
    top = rng.randrange(height - crop_h) if crop_h < height else 0
    left = rng.randrange(width - crop_w) if crop_w < width else 0
    return top, left, crop_h, crop_w


def tf_sample_distorted_bounding_box(height: int, width: int, rng=random,
                                     min_object_covered: float = TRAIN_MIN_OBJECT_COVERED,
                                     aspect_ratio_range: tuple[float, float] = TRAIN_ASPECT_RATIO_RANGE,
                                     area_range: tuple[float, float] = TRAIN_AREA_RANGE,
                                     max_attempts: int = TRAIN_MAX_ATTEMPTS) -> tuple[int, int, int, int] | None:
    """TF's sample_distorted_bounding_box with the whole image as the one bounding box: (top, left,
    crop_height, crop_width), or None when every attempt failed (TF's op then returns the whole image).

    Each attempt draws an aspect ratio (width / height) uniformly in `aspect_ratio_range` (linear, not
    log-uniform as torchvision), then a crop as `_random_crop_once`; the crop is kept if it covers at
    least `min_object_covered` of the image, which for the whole image as the box means an area of at
    least that fraction. `rng` is a random.Random (default: the `random` module, which the loader
    seeds per sample); TF's own Philox stream is not reproduced, its distribution is."""
    if min(area_range) <= 0 or max(area_range) > 1 or min(aspect_ratio_range) <= 0 or max_attempts <= 0:
        raise ValueError(f"TF refuses area_range={area_range}, aspect_ratio_range={aspect_ratio_range}, "
                         f"max_attempts={max_attempts}")
    min_area = f32(area_range[0]) * f32(width) * f32(height)
    max_area = f32(area_range[1]) * f32(width) * f32(height)
    low, high = f32(aspect_ratio_range[0]), f32(aspect_ratio_range[1])
    image_area, covered = f32(width * height), f32(min_object_covered)
    if area_range[0] > area_range[1]:  # TF's attempts all fail
        return None
    for _ in range(max_attempts):
        aspect = f32(rng.getrandbits(23) * 2.0 ** -23) * (high - low) + low  # RandFloat: 23 random bits
        box = _random_crop_once(height, width, min_area, max_area, aspect, rng)
        if box is not None and f32(box[2] * box[3]) >= f32(1.0) and f32(box[2] * box[3]) / image_area >= covered:
            return box
    return None


def tf_train_crop_box(height: int, width: int, image_size: int, rng=random, channels: int = 3,
                      crop_padding: int = CROP_PADDING) -> tuple[int, int, int, int]:
    """preprocessing.py's `_decode_and_random_crop` box: the sampled crop, or the eval center crop when
    the op returned the whole image (every attempt failed, or a draw that equals it). TF decides that
    with `_at_least_x_are_equal(jpeg_shape, crop_shape, 3)` on (height, width, channels), where the
    JPEG's channels meet the decoded crop's 3: a grayscale JPEG (channels=1) never falls back, and its
    whole image is resized as it is."""
    box = tf_sample_distorted_bounding_box(height, width, rng)
    if box is None:
        box = (0, 0, height, width)
    if box[2] == height and box[3] == width and channels == 3:
        return tf_center_crop_box(height, width, image_size, crop_padding)
    return box


# -- the eval crop

def crop_padding_for_fraction(image_size: int, crop_fraction: float = 0.875) -> int:
    """TF's current code: the padding that makes image_size / (image_size + padding) about
    `crop_fraction` (32 at 224, 34 at B1's 240, 86 at B7's 600), rounded as Python's round does."""
    return round(image_size * (1 / crop_fraction - 1))


def tf_center_crop_box(height: int, width: int, image_size: int, crop_padding: int = CROP_PADDING
                       ) -> tuple[int, int, int, int]:
    """preprocessing.py's `_decode_and_center_crop` box (top, left, size, size): size =
    int(image_size / (image_size + crop_padding) x short side), the ratio a float32 (TF turns the
    Python float into a float32 constant) and the product truncated; offsets ((h - size + 1) // 2,
    (w - size + 1) // 2). Resized to image_size afterwards."""
    size = int(f32(image_size / (image_size + crop_padding)) * f32(min(height, width)))
    return (height - size + 1) // 2, (width - size + 1) // 2, size, size


# -- the resize: tf.compat.v1.image.resize_bicubic

@functools.lru_cache(maxsize=1024)
def _legacy_bicubic_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """The (out, in) float32 matrix of TF's legacy bicubic along one axis: source = dst x (in / out) in
    float32, the fraction looked up in TF's 1,024-step table of the a = -0.75 cubic, taps at
    floor(source) - 1 .. + 2 clamped to the image (a clamped tap adds its weight to the edge pixel)."""
    steps = 1024
    x = np.arange(steps + 1) / steps
    a = -0.75
    near = (((a + 2) * x - (a + 3)) * x * x + 1).astype(np.float32)  # |distance| = x
    x1 = x + 1
    far = (((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a).astype(np.float32)  # |distance| = x + 1
    source = np.arange(out_size, dtype=np.float32) * (f32(in_size) / f32(out_size))
    base = np.floor(source).astype(np.int64)
    offset = np.rint((source - base.astype(np.float32)) * f32(steps)).astype(np.int64)
    weights = np.stack([far[offset], near[offset], near[steps - offset], far[steps - offset]], axis=1)
    taps = np.clip(base[:, None] + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return torch.from_numpy(matrix)


def tf_resize_bicubic_float(image: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """TF's resize_bicubic output exactly (to float32 rounding): (3, H, W) uint8 -> (3, out_h, out_w)
    float32, neither rounded nor clipped (the cubic overshoots [0, 255] at edges). What TF's model
    sees without AutoAugment; slow (dense matrices): a reference, not the loader's path."""
    rows, cols = _legacy_bicubic_matrix(image.shape[1], out_h), _legacy_bicubic_matrix(image.shape[2], out_w)
    return rows @ image.float() @ cols.T


def tf_resize_bicubic(image: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """TF's legacy resize_bicubic, fast, to uint8: (3, H, W) uint8 -> (3, out_h, out_w) uint8 in
    channels-last memory, rounded to nearest and clipped.

    torch's uint8 bicubic (its AVX2 kernel, a = -0.75 without antialiasing) with TF's coordinate map:
    with align_corners it maps dst -> dst x (in' - 1) / (out' - 1), so an input padded by one
    replicated row and column (in' = in + 1) resized to out + 1 maps dst -> dst x in / out, TF's
    map, and the extra output row and column are dropped. On TF's 224 px train crops of photos it is
    within one level of TF (rounded) on 99.9% of pixels, 0.16 levels mean. The rest: torch rounds and
    clips its intermediate (row-resized) image to uint8, so next to saturated high-contrast edges a
    pixel can be off by 16 levels on a photo, 20-odd on noise; and when upsampling, a tap before the
    first pixel (or past the padded last one) is dropped and the rest renormalized, where TF repeats
    the edge pixel. tf_resize_bicubic_float has TF's values but takes 2.1 ms against 0.3 ms here for
    a 301x271 crop to 224 (one core): too slow for a loader worker."""
    channels, height, width = image.shape
    padded = torch.empty(1, height + 1, width + 1, channels, dtype=torch.uint8)
    padded[0, :height, :width] = image.permute(1, 2, 0)
    padded[0, height, :width] = padded[0, height - 1, :width]
    padded[0, :, width] = padded[0, :, width - 1]
    out = F.interpolate(padded.permute(0, 3, 1, 2), size=(out_h + 1, out_w + 1), mode="bicubic", align_corners=True)
    return out[0, :, :out_h, :out_w].permute(1, 2, 0).contiguous().permute(2, 0, 1)


# -- AutoAugment's posterize

def tf_posterize(image, bits: int):
    """autoaugment.py's posterize: shift = 8 - bits, then uint8 right shift and left shift by it. TF's CPU
    kernels clamp a shift to [0, 7], so 0 bits keeps the top bit (values {0, 128}) like 1 bit, and
    more than 8 bits changes nothing. (XLA, by contrast, zeroes a shift of 8: a black image; the input
    pipeline runs the CPU kernels, the TPU host's too.) A PIL image or a uint8 tensor; its type back."""
    shift = min(max(8 - int(bits), 0), 7)
    if isinstance(image, Image.Image):
        return Image.eval(image, lambda value: (value >> shift) << shift)
    return (image >> shift) << shift


def tf_posterize_op(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """tf_posterize with the signature of timm's AutoAugment op functions (its `aug_fn`)."""
    return tf_posterize(image, bits_to_keep)


# -- the transforms

@raises_corrupt_image
def jpeg_channels(data: bytes) -> int:
    """The channel count TF's extract_jpeg_shape reports: 1 for a grayscale JPEG, else 3 (TF's
    ImageNet records hold CMYK images and PNGs re-encoded as RGB JPEGs; anything else counts as 3)."""
    if data[:2] == JPEG_MAGIC:
        try:
            return 1 if simplejpeg.decode_jpeg_header(data)[2] == "Gray" else 3
        except ValueError:
            pass  # PIL decodes it, or names what is wrong with it, in decode_pixels
    return 3


class TFCrop(T.Transform):
    """A TF crop box on the original size, the crop, and TF's legacy bicubic resize to image_size x
    image_size: a uint8 (3, image_size, image_size) tensor in channels-last memory.

    An EncodedImage (file bytes) is decoded here at full size with libjpeg's fast IDCT, TF's
    decode_jpeg default (`fast_dct`); a PIL image or a uint8 (3, H, W) tensor is cropped as it is.

    No reduced-size (DCT-scaled) decode, unlike DecodeRandomResizedCrop: TF resizes a full-resolution
    crop with 4 taps and no antialiasing, so a crop decoded at half size (smoothed by the DCT scaling)
    gives other pixels: 8.7 levels mean absolute difference, up to 219, on crops of scikit-learn's
    photos at 96-112 px. And it buys little: on those photos a half-size decode took 1.19 ms against
    1.38 ms for the full one (the entropy decoding stays), and at 224 px it never applies to a
    500x375 image (the crop would need 448 px)."""

    def __init__(self, image_size: int, crop_padding: int = CROP_PADDING, fast_dct: bool = True):
        super().__init__()
        self.image_size, self.crop_padding, self.fast_dct = image_size, crop_padding, fast_dct

    @abstractmethod
    def box(self, height: int, width: int, channels: int) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width) for an image of this size and JPEG channel count."""

    def forward(self, *inputs):
        image = inputs[0]
        if isinstance(image, EncodedImage):
            width, height = image_size(image.data)
            top, left, crop_h, crop_w = self.box(height, width, jpeg_channels(image.data))
            pixels = decode_pixels(image.data, 1, self.fast_dct)[0]
        else:
            channels = 3
            if isinstance(image, Image.Image):
                channels = 1 if image.mode in ("L", "I;16") else 3
                image = to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
            pixels = image
            top, left, crop_h, crop_w = self.box(pixels.shape[1], pixels.shape[2], channels)
        crop = pixels[:, top:top + crop_h, left:left + crop_w]
        return tf_resize_bicubic(crop, self.image_size, self.image_size)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, crop_padding={self.crop_padding}, fast_dct={self.fast_dct}"


class TFRandomCrop(TFCrop):
    """TF's training crop (`_decode_and_random_crop`): sample_distorted_bounding_box's box, or the eval
    crop when the op returned the whole image; its random numbers come from the `random` module."""

    def box(self, height: int, width: int, channels: int) -> tuple[int, int, int, int]:
        return tf_train_crop_box(height, width, self.image_size, random, channels, self.crop_padding)


class TFCenterCrop(TFCrop):
    """TF's eval crop (`_decode_and_center_crop`): image_size / (image_size + crop_padding) of the short
    side, centred, resized to image_size. crop_padding=crop_padding_for_fraction(image_size) gives TF's
    current code; the default, 32, the code of the published checkpoints (the same at 224)."""

    def box(self, height: int, width: int, channels: int) -> tuple[int, int, int, int]:
        return tf_center_crop_box(height, width, self.image_size, self.crop_padding)
