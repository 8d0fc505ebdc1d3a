"""AutoAugment and RandAugment from timm's policy strings, with TF's behaviour where the recipe
needs it (0-bit Posterize, nearest-neighbour geometry); parsed strictly, so a typo fails at load."""
from __future__ import annotations

import re

from PIL import Image
from timm.data.auto_augment import auto_augment_transform, rand_augment_transform
from timm.data.auto_augment import posterize as timm_posterize  # named apart from ours below
from timm.data.transforms import str_to_pil_interp

from .tf_pipeline import tf_posterize_op


def build_auto_augment(policy: str, image_size: int, translate_pct: float, interpolation: str, tf_posterize: bool):
    """timm's AutoAugment ("original", "v0", ... "-mstd0.5") or RandAugment ("rand-m9-mstd0.5") from
    its policy string, its geometric ops resampling with `interpolation` ("random": timm's draw), its
    Posterize TF's (`tf_posterize`) or timm's; a string that does not parse raises ValueError with a
    one-line message."""
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
            op.aug_fn = tf_posterize_op if tf_posterize else posterize_keeping_zero_bits
    return transform


def posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, as it ran with Pillow before 13, which gave a black image for 0 bits (Pillow 13
    raises ValueError there, which stopped every image that drew the op). AutoAugment v0 asks for 0 bits
    (its ('Posterize', 0.8, 2) keeps int(2 / 10 * 4)), as do RandAugment's top magnitudes. TF gives
    {0, 128} instead: tf_pipeline.tf_posterize_op, for data.pipeline=tf."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_posterize(img, bits_to_keep)
