"""Data: one test per known way an input pipeline silently goes wrong, named after it, plus the
augmentation settings.
Images are generated with PIL into tmp_path (non-square where it matters)."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from trainer.config import ConfigError, DataConfig, load_config
from trainer.data.loaders import TransformedSubset, build_loaders
from trainer.data.seeding import seeded
from trainer.data.sources import FolderImages
from trainer.data.transforms import eval_transform, train_transform

BILINEAR, BICUBIC = T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise on a left-to-right ramp: orientation shows, and every filter gives different pixels."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 160, width)[None, :, None]
    pixels = ramp + rng.integers(0, 96, size=(height, width, 3))
    return Image.fromarray(pixels.astype(np.uint8))


def image_tree(root, per_class: int, size=(40, 30), same_image: bool = False):
    """An ImageFolder tree: two class folders of PNGs (width x height = size)."""
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            noise_image(*size, seed=0 if same_image else 100 * c + k).save(root / f"class{c}" / f"{k}.png")
    return root


def folder_cfg(root, **kw) -> DataConfig:
    return DataConfig(source="imagefolder", path=str(root), **kw)


def as_tensor(img: Image.Image) -> torch.Tensor:
    return T.Compose([T.ToImage(), T.ToDtype(torch.uint8)])(img)


# -- pitfall: "Horizontal flip applied always instead of with p=0.5"

@pytest.mark.parametrize("p, low, high", [(0.5, 0.43, 0.57), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)])
def test_flip_happens_with_the_configured_probability(tmp_path, p, low, high):
    root = image_tree(tmp_path / "tree", per_class=1, size=(16, 16))
    # scale 1, ratio 1: the crop is the whole 16x16 image, so each output is the image or its mirror
    cfg = folder_cfg(root, image_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=p)
    images = FolderImages(str(root))
    original = as_tensor(images.load(0)[0])
    n = 1000 if 0 < p < 1 else 100
    outputs = TransformedSubset(images, [0] * n, train_transform(cfg), seed=0)
    flipped = 0
    for i in range(n):
        out = outputs[i][0]
        assert torch.equal(out, original) or torch.equal(out, original.flip(-1))
        flipped += not torch.equal(out, original)
    assert low <= flipped / n <= high


# -- pitfall: "Eval by squashing to 224x224 instead of resizing the short side and center
#    cropping; eval resize fixed at 256 for every model size instead of crop / crop_pct"

# (image_size, crop_pct, short side = floor(image_size / crop_pct), long side of a 640x480 image)
EVAL_SIZES = [(224, 0.875, 256, 341), (240, 0.882, 272, 362), (380, 0.9, 422, 562), (600, 0.949, 632, 842)]


@pytest.mark.parametrize("image_size, crop_pct, short, long", EVAL_SIZES)
def test_eval_resize_follows_crop_pct(image_size, crop_pct, short, long):
    img = noise_image(640, 480)
    cfg = DataConfig(image_size=image_size, crop_pct=crop_pct, interpolation="bicubic")
    out = eval_transform(cfg)(img)
    reference = TF.center_crop(as_tensor(TF.resize(img, [short, long], interpolation=BICUBIC)), [image_size] * 2)
    assert out.shape == (3, image_size, image_size)
    assert torch.equal(out, reference)
    if short != 256:  # not the fixed-256 resize
        fixed = TF.center_crop(as_tensor(TF.resize(img, [256, 341], interpolation=BICUBIC)), [image_size] * 2)
        assert not torch.equal(out, fixed)


# -- pitfall: "OpenCV shapes read as (w, h) instead of (h, w): wrong on non-square sizes"

@pytest.mark.parametrize("width, height, resized_hw", [(300, 200, (256, 384)), (200, 300, (384, 256))])
@pytest.mark.parametrize("as_pil", [True, False])  # ImageFolder images are PIL, the digits are tensors
def test_non_square_images_keep_their_orientation(width, height, resized_hw, as_pil):
    img = noise_image(width, height)
    source = img if as_pil else as_tensor(img)
    cfg = DataConfig(image_size=224, crop_pct=0.875, interpolation="bilinear")
    out = eval_transform(cfg)(source)
    # short side to 224 / 0.875 = 256, long side in proportion, then the central 224x224
    resized = TF.resize(source, list(resized_hw), interpolation=BILINEAR)
    assert torch.equal(out, TF.center_crop(as_tensor(resized) if as_pil else resized, [224, 224]))
    transposed = TF.resize(source, list(resized_hw[::-1]), interpolation=BILINEAR)
    assert not torch.equal(out, TF.center_crop(as_tensor(transposed) if as_pil else transposed, [224, 224]))
    columns = out.float().mean(dim=(0, 1))
    assert columns[:20].mean() < columns[-20:].mean()  # the left-to-right ramp is still left to right


# -- pitfall: "PIL resize with its default filter instead of bilinear/bicubic"

@pytest.mark.parametrize("configured, other", [("bilinear", BICUBIC), ("bicubic", BILINEAR)])
def test_interpolation_is_the_configured_one(configured, other):
    img = noise_image(300, 200)
    mode = T.InterpolationMode(configured)

    # eval: resize short side to 256 (300x200 -> 384x256), center crop 224
    out = eval_transform(DataConfig(image_size=224, interpolation=configured))(img)
    def eval_ref(interp):
        return TF.center_crop(as_tensor(TF.resize(img, [256, 384], interpolation=interp)), [224, 224])
    assert torch.equal(out, eval_ref(mode))
    assert not torch.equal(out, eval_ref(other))
    assert not torch.equal(out, eval_ref(T.InterpolationMode.NEAREST))

    # train: the same random crop (same seed) resampled with the configured filter
    cfg = DataConfig(image_size=64, hflip=0.0, interpolation=configured)
    def train_ref(interp):
        with seeded(7):
            return as_tensor(T.RandomResizedCrop(64, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                                 interpolation=interp, antialias=True)(img))
    with seeded(7):
        out = train_transform(cfg)(img)
    assert torch.equal(out, train_ref(mode))
    assert not torch.equal(out, train_ref(other))


# -- pitfall: "Every dataloader worker, rank and epoch drawing the same augmentation random
#    numbers (numpy not reseeded per worker)"

def test_augmentation_random_numbers_differ_across_workers_ranks_and_epochs(tmp_path):
    # every file holds the same picture: any difference between outputs is augmentation randomness.
    # RandAugment draws from numpy and python's random, the crop and color jitter from torch.
    root = image_tree(tmp_path / "tree", per_class=8, size=(40, 30), same_image=True)
    cfg = folder_cfg(root, image_size=16, val_fraction=0.25, auto_augment="rand-m9-mstd0.5", color_jitter=0.4)

    def epoch_images(num_workers, rank=0, world=1, epoch=0):
        loaders = build_loaders(cfg.model_copy(update={"num_workers": num_workers}), micro_batch=2, seed=0,
                                rank=rank, world_size=world)
        loaders.start_epoch(epoch)
        return torch.cat([images for images, _ in loaders.train])

    # workers: two workers take alternate batches; no two outputs of the epoch are the same
    two_workers = epoch_images(num_workers=2)
    assert len(two_workers) == 12
    assert len({tuple(x.flatten().tolist()) for x in two_workers}) == 12
    # a pure function of (seed, epoch, index): the worker that computed it does not matter
    assert torch.equal(two_workers, epoch_images(num_workers=0))

    # ranks: rank 0 and rank 1 of world 2 draw different crops
    rank0, rank1 = epoch_images(0, rank=0, world=2), epoch_images(0, rank=1, world=2)
    assert len(rank0) == len(rank1) == 6 and not any(torch.equal(a, b) for a in rank0 for b in rank1)

    # epochs: every index is augmented differently in epoch 1 than in epoch 0, identically when repeated
    loaders = build_loaders(cfg, micro_batch=2, seed=0, rank=0, world_size=1)
    dataset = loaders.train.dataset
    def sample(epoch, i):
        dataset.epoch = epoch
        return dataset[i][0]
    for i in range(len(dataset)):
        assert not torch.equal(sample(0, i), sample(1, i))
        assert torch.equal(sample(1, i), sample(1, i))  # same (seed, epoch, index): same output
    # and the run seed matters
    other_seed = build_loaders(cfg, micro_batch=2, seed=1, rank=0, world_size=1).train.dataset
    assert not torch.equal(other_seed[0][0], sample(0, 0))


# -- pitfall: "A distributed validation sampler that pads the set with duplicates, so top-1 is
#    computed on more than 50,000 images"

@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_validation_counts_every_image_exactly_once(world):
    shards = [list(build_loaders(DataConfig(), micro_batch=64, seed=0, rank=r, world_size=world).val.sampler)
              for r in range(world)]
    every = [i for shard in shards for i in shard]
    assert len(every) == 359 and sorted(every) == list(range(359))  # 20% of 1,797 digits, no duplicate


def test_validation_loader_yields_every_image_once_on_a_folder(tmp_path):
    root = image_tree(tmp_path / "tree", per_class=11, size=(20, 14))
    cfg = folder_cfg(root, image_size=8, val_fraction=0.5)  # 11 val images over 3 or 4 ranks
    for world in (3, 4):
        images = []
        for rank in range(world):
            loaders = build_loaders(cfg, micro_batch=2, seed=0, rank=rank, world_size=world)
            images += [x for batch, _ in loaders.val for x in batch]
        assert len(images) == loaders.val_size == 11
        assert len({tuple(x.flatten().tolist()) for x in images}) == 11


# -- the augmentation settings

@pytest.mark.parametrize("policy", ["v1", "rand-mnine", "rand-m9.5", "randaug", "original-foo1", "v0-", "augmix-m5"])
def test_auto_augment_policy_that_does_not_parse_is_rejected_at_load(policy):
    with pytest.raises(ConfigError, match="config key 'data.auto_augment'.*does not parse") as err:
        load_config("demo", [f"data.auto_augment={policy}"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("policy", ["original", "v0", "v0r-mstd0.5", "3a", "rand-m9-mstd0.5", "rand-m9-n3-inc1-tweights"])
def test_auto_augment_policies_load_and_run(policy):
    cfg = load_config("demo", [f"data.auto_augment={policy}"])
    digit = torch.full((3, 8, 8), 200, dtype=torch.uint8)  # the digits are tensors, AA needs PIL
    with seeded(0):
        assert train_transform(cfg.data)(digit).shape == (3, 32, 32)


@pytest.mark.parametrize("policy", ["v0", "original", "rand-m9-mstd0.5", "rand-m10-mstd1-inc1"])
def test_every_auto_augment_op_runs_at_every_draw(policy):
    """Each op forced on, many draws: TF's v0 asks Posterize for 0 bits, which Pillow 13 refuses."""
    from trainer.data.augment import build_auto_augment

    aa = build_auto_augment(policy, image_size=32, translate_pct=0.45, interpolation="bicubic", tf_posterize=False)
    ops = aa.ops if hasattr(aa, "ops") else [op for sub_policy in aa.policy for op in sub_policy]
    for op in ops:
        op.prob = 1.0
    img = noise_image(32, 32)
    for draw in range(200):
        with seeded(draw):
            assert aa(img).size == (32, 32)
    if policy == "v0":  # ('Posterize', 0.8, 2) keeps int(2 / 10 * 4) = 0 bits: timm (Pillow < 13) gives black
        zero_bits = next(op for op in ops if op.name == "Posterize" and op.magnitude == 2)
        assert not np.asarray(zero_bits(img)).any()


def test_tf_pipeline_posterizes_zero_bits_as_tf_does():
    """TF's CPU kernel clamps the shift of a 0-bit posterize to 7: {0, 128}, not black."""
    from trainer.data.augment import build_auto_augment

    aa = build_auto_augment("v0", image_size=32, translate_pct=0.45, interpolation="nearest", tf_posterize=True)
    zero_bits = next(op for sub_policy in aa.policy for op in sub_policy if op.name == "Posterize" and op.magnitude == 2)
    zero_bits.prob = 1.0
    img = noise_image(32, 32)
    out = np.asarray(zero_bits(img))
    assert set(np.unique(out)) == {0, 128} and np.array_equal(out, (np.asarray(img) >= 128) * 128)


@pytest.mark.parametrize("interpolation, new_values", [("nearest", False), ("bicubic", True), ("random", True)])
def test_auto_augment_geometry_samples_nearest_as_tf_does(interpolation, new_values):
    from trainer.data.augment import build_auto_augment

    assert DataConfig().aa_interpolation == "nearest"  # tf.contrib.image's rotate and transform default
    aa = build_auto_augment("v0", image_size=32, translate_pct=0.45, interpolation=interpolation, tf_posterize=False)
    rotate = next(op for sub_policy in aa.policy for op in sub_policy if op.name == "Rotate")
    rotate.prob = 1.0
    img = noise_image(32, 32)
    colors = {tuple(c) for c in np.asarray(img).reshape(-1, 3)} | {(128, 128, 128)}  # + TF's fill
    with seeded(0):
        out = {tuple(c) for c in np.asarray(rotate(img)).reshape(-1, 3)}
    assert (not out <= colors) == new_values  # nearest copies pixels; a filter mixes them


def test_a_failing_augmentation_stops_the_loader_and_is_not_counted_as_a_corrupt_image(tmp_path):
    def broken(image):
        raise ValueError("an augmentation bug")

    images = FolderImages(str(image_tree(tmp_path / "tree", per_class=3)))
    with pytest.raises(ValueError, match="an augmentation bug"):
        TransformedSubset(images, list(range(6)), broken, seed=0)[0]
    assert images.corrupt.sum() == 0


def test_a_file_gone_after_the_scan_is_replaced_and_counted(tmp_path, capfd):
    tree = image_tree(tmp_path / "tree", per_class=3)
    images = FolderImages(str(tree))
    (tree / "class0" / "0.png").unlink()
    subset = TransformedSubset(images, list(range(6)), eval_transform(DataConfig(image_size=16)), seed=0)
    assert [subset[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert torch.equal(subset[0][0], subset[1][0])  # sample 0 replaced by the next one
    assert images.corrupt.sum() == 1 and str(tree / "class0" / "0.png") in capfd.readouterr().err


@pytest.mark.parametrize("order", ["after_crop", "before_crop"])
def test_auto_augment_runs_before_or_after_the_crop_as_configured(order):
    from timm.data.auto_augment import AutoAugment

    steps = train_transform(DataConfig(auto_augment="v0", aa_order=order)).transforms
    kinds = [type(s) for s in steps]
    # the crop is RandomResizedCrop or its subclass that decodes encoded images itself (trainer/data/decode.py)
    crop = next(k for k, step in enumerate(steps) if isinstance(step, T.RandomResizedCrop))
    aa = kinds.index(AutoAugment)
    assert (aa > crop) == (order == "after_crop")
    if order == "after_crop":
        assert kinds.index(T.RandomHorizontalFlip) < aa  # TF: crop, flip, then AutoAugment
    img = noise_image(50, 30)
    with seeded(0):
        assert train_transform(DataConfig(image_size=24, auto_augment="v0", aa_order=order))(img).shape == (3, 24, 24)


def test_color_jitter_is_applied_when_set_even_with_auto_augment():
    img = noise_image(32, 32)
    base = DataConfig(image_size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0)
    with seeded(3):
        plain = train_transform(base)(img)
    assert torch.equal(plain, as_tensor(img))
    jitter = base.model_copy(update={"color_jitter": 0.4})
    with seeded(3):
        assert not torch.equal(train_transform(jitter)(img), plain)
    kinds = [type(s) for s in train_transform(jitter.model_copy(update={"auto_augment": "v0"})).transforms]
    assert T.ColorJitter in kinds  # timm drops it when AA is on; we never ignore a set value


@pytest.mark.parametrize("overrides, key", [
    (["data.crop_ratio=[1.5, 1.0]"], "data"),
    (["data.hflip=1.5"], "data.hflip"),
    (["data.random_erasing=-0.1"], "data.random_erasing"),
    (["data.interpolation=nearest"], "data.interpolation"),
    (["data.aa_order=middle"], "data.aa_order"),
])
def test_impossible_data_settings_fail_at_load(overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config("demo", overrides)
