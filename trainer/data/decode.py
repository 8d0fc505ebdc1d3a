"""Decoding encoded images (JPEG/PNG bytes) straight into the first transform, fast.

A data source hands the transforms an `EncodedImage` (the file's bytes, not yet decoded). The
first geometric transform decodes it:

- train (`DecodeRandomResizedCrop`): the crop box is drawn on the ORIGINAL image size, with
  torchvision's own `RandomResizedCrop.make_params` (same random draws as on a decoded image), so
  the crop distribution is torchvision's. Then a JPEG is decoded at 1/2, 1/4 or 1/8 size by
  libjpeg-turbo's DCT scaling when the crop, so reduced, still has at least the output
  resolution; the box is mapped into the reduced image, cropped and resized.
- eval (`DecodeResize`): the short side is drafted down to no less than the resize target; the
  output size is computed from the original size, so it is the one a full decode gives.

JPEGs are decoded by simplejpeg (libjpeg-turbo straight into a numpy array: 0.30 ms for a 500x375
JPEG where PIL's open, decode and RGB array take 0.48 ms); other formats, and the JPEGs libjpeg-turbo
cannot turn into RGB (CMYK), by PIL. `fast_dct` picks libjpeg's fast integer IDCT (JDCT_IFAST), the
default of TF's decode_jpeg and so of the TF recipe (5% faster, within 4/255 of the accurate one);
PIL always uses the accurate one. Only power-of-2 reductions are used: libjpeg-turbo's M/8 scalings
in between decode slower than the full image. The crop is copied out into a contiguous channels-last
uint8 block and resized there (torchvision's AVX2 antialiased resize: 3-4x faster than PIL's and
within 1/255 of it, and 1.5x faster again on a contiguous block than on the strided view); the
output stays channels-last (the loader stacks it so, see `collate_channels_last`).
Anything that is not an `EncodedImage` (a decoded PIL image, the digits' tensors) takes
torchvision's own path unchanged; a PIL result comes back as a uint8 tensor.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

# what a corrupt, truncated or non-image file raises while it is opened or decoded
# (UnidentifiedImageError and "image file is truncated" are OSErrors; some plugins raise SyntaxError)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
JPEG_MAGIC = b"\xff\xd8"


class CorruptImage(Exception):
    """A file that cannot be read or does not decode: the loader replaces it and counts it. Only
    this is caught there; any other error (a bug in an augmentation) stops the run."""


def raises_corrupt_image(decode):
    """The decoding errors of `decode` become CorruptImage, with their first line as the reason."""
    @functools.wraps(decode)
    def wrapper(*args, **kwargs):
        try:
            return decode(*args, **kwargs)
        except DECODE_ERRORS as err:
            raise CorruptImage(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
    return wrapper


@dataclass
class EncodedImage:
    data: bytes  # the file's bytes: JPEG, PNG, or anything PIL opens
    name: str  # where it came from, for messages


@raises_corrupt_image
def decoded_rgb(data: bytes | Image.Image, draft_scale: int = 1) -> tuple[Image.Image, float]:
    """Decode bytes (or a PIL image opened and not yet loaded) to an RGB PIL image, a JPEG at
    1/draft_scale size (DCT scaling) when asked; also return the decoded size over the original
    size (1, 1/2, 1/4 or 1/8)."""
    img = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    factor = 1.0
    if draft_scale > 1 and img.format == "JPEG":
        width, height = img.size
        drafted = img.draft("RGB", (width // draft_scale, height // draft_scale))
        if drafted is not None:  # PIL keeps pixel k of the reduced image at original k * scale
            factor = drafted[1][2] / width
    img.load()
    return (img if img.mode == "RGB" else img.convert("RGB")), factor


@raises_corrupt_image
def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone."""
    if data[:2] == JPEG_MAGIC:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return width, height
        except ValueError:
            pass  # PIL says what is wrong with it, or reads what libjpeg-turbo cannot
    return Image.open(io.BytesIO(data)).size


@raises_corrupt_image
def decode_pixels(data: bytes, draft_scale: int = 1, fast_dct: bool = False) -> tuple[torch.Tensor, float]:
    """Decode to a (3, H, W) uint8 tensor (channels-last memory), a JPEG at 1/draft_scale size (with
    libjpeg's fast IDCT if asked); also return the decoded width over the original width."""
    if data[:2] == JPEG_MAGIC:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            # the smallest libjpeg-turbo scaling with at least these sizes is exactly 1/draft_scale
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast_dct,
                                            min_width=-(-width // draft_scale), min_height=-(-height // draft_scale))
            return torch.from_numpy(pixels).permute(2, 0, 1), pixels.shape[1] / width
        except ValueError:
            pass  # CMYK, or corrupt: PIL decodes the first and names the trouble with the second
    img, factor = decoded_rgb(data, draft_scale)
    return to_tensor(img), factor


def draft_scale_for(crop_w: float, crop_h: float, out_w: int, out_h: int) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) that leaves the crop at least out_w x out_h."""
    for scale in (8, 4, 2):
        if crop_w / scale >= out_w and crop_h / scale >= out_h:
            return scale
    return 1


def channels_last_copy(pixels: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) view (a crop) copied into its own contiguous channels-last block."""
    return pixels.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) uint8 in channels-last memory: the layout torchvision's fast
    uint8 resize works on."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


class DecodesEncodedImages:
    """Mixin for a torchvision transform: it decodes an EncodedImage itself (`from_encoded`, drafting
    a JPEG down where `draft` allows, with the fast IDCT if `fast_dct`); a PIL image or a tensor goes
    to the transform unchanged, and a PIL result becomes a uint8 tensor: the output is always one."""

    def __init__(self, *args, draft: bool = True, fast_dct: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.draft, self.fast_dct = draft, fast_dct

    def forward(self, *inputs):
        image = inputs[0] if len(inputs) == 1 else None
        if isinstance(image, EncodedImage):
            return self.from_encoded(image)
        if isinstance(image, Image.Image):  # torchvision's PIL path, exactly
            return to_tensor(super().forward(image if image.mode == "RGB" else image.convert("RGB")))
        return super().forward(*inputs)


class DecodeRandomResizedCrop(DecodesEncodedImages, T.RandomResizedCrop):
    """RandomResizedCrop that decodes an EncodedImage itself, at reduced size where the crop allows."""

    def from_encoded(self, image: EncodedImage) -> torch.Tensor:
        return self.crop_encoded(image)[0]

    def crop_encoded(self, image: EncodedImage):
        """The output tensor and the crop box (top, left, height, width) in original coordinates."""
        full_w, full_h = image_size(image.data)
        # torchvision's draws on the original size (a view with that shape: nothing is decoded yet)
        params = self.make_params([torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, full_h, full_w)])
        out_h, out_w = self.size
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        scale = draft_scale_for(width, height, out_w, out_h) if self.draft else 1
        pixels, factor = decode_pixels(image.data, scale, self.fast_dct)
        if factor != 1.0:  # the box in reduced pixels, rounded to the nearest (under 1/2 output px)
            bottom, right = round((top + height) * factor), round((left + width) * factor)
            top, left = round(top * factor), round(left * factor)
            bottom, right = min(bottom, pixels.shape[1]), min(right, pixels.shape[2])
            height, width = bottom - top, right - left
        crop = channels_last_copy(pixels[:, top:top + height, left:left + width])
        out = TF.resize(crop, [out_h, out_w], interpolation=self.interpolation, antialias=self.antialias)
        return out, params


def resized_size(height: int, width: int, size: list[int]) -> tuple[int, int]:
    """torchvision's Resize output size: [short] scales the short side (long side truncated), [h, w] is exact."""
    if len(size) == 2:
        return size[0], size[1]
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size[0], int(size[0] * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


class DecodeResize(DecodesEncodedImages, T.Resize):
    """Resize (short side to `size`) that decodes an EncodedImage itself, drafting a JPEG down to
    no less than the output size; the output size is computed from the original image size."""

    def from_encoded(self, image: EncodedImage) -> torch.Tensor:
        width, height = image_size(image.data)
        out_h, out_w = resized_size(height, width, self.size)
        scale = draft_scale_for(width, height, out_w, out_h) if self.draft else 1
        pixels, _ = decode_pixels(image.data, scale, self.fast_dct)
        out = TF.resize(pixels, [out_h, out_w], interpolation=self.interpolation, antialias=self.antialias)
        return out


class Decode(T.Transform):
    """Full decode to an RGB PIL image (for transforms that need one first, e.g. AutoAugment
    before the crop); anything else passes through."""

    def forward(self, *inputs):
        image = inputs[0] if len(inputs) == 1 else None
        if isinstance(image, EncodedImage):
            return decoded_rgb(image.data)[0]
        return inputs[0] if len(inputs) == 1 else inputs
