"""The run configuration: one typed tree, loaded from a recipe, overlaid with a
variant and `key=value` overrides, validated, then frozen.

Each section is its own model so that a factory takes only its section
(`build_model(cfg.model)`), never the whole tree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import re

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A configuration the trainer refuses; the CLI prints it on one line and exits 2."""


def yaml_off(value):
    return "off" if value is False else value  # YAML reads a bare `off` (mixup.mode=off) as false


# the largest image side: past every EfficientNet (B7 trains at 600, L2 at 800), below the sizes whose
# tensors cannot be allocated (a typo such as data.image_size=22400 asked 1.5 GB per image)
MAX_IMAGE_SIZE = 4096
# a seed goes to torch's generators, which take 64 bits, with the epoch added (DistributedSampler)
Seed = Annotated[int, Field(ge=0, lt=2**63)]
# timeouts become a timedelta, the process group's milliseconds and threading waits, which overflow
# long before 1e300 s; no run needs more than a year
LONGEST_TIMEOUT_S = 365 * 24 * 3600.0


class Section(BaseModel):
    # extra="forbid": an unknown or misspelt key is an error, never silently ignored.
    # allow_inf_nan=False: no setting means infinity or NaN (optim.lr=.inf, train.epochs=1e400 passed
    # the bounds and failed at the first int() or optimizer step)
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


class DataConfig(Section):
    # synthetic: random uint8 images already at image_size, 1000 classes, no augmentation: for
    # measuring the trainer and the model alone (`bench train`, launch/bench_gpu.py), not for training
    source: Literal["digits", "imagefolder", "lmdb", "synthetic"] = "digits"
    synthetic_images: int = Field(1024, ge=2)
    # imagefolder: the root (class folders); lmdb: the file `python -m trainer pack ROOT FILE` wrote
    path: Optional[str] = None
    # a separate validation set (ImageNet's 50,000 validation images as class folders, or an LMDB packed
    # from them) with the training classes: then all of `path` trains. Unset: val_fraction of `path` is
    # held out with split_seed, and the run says its numbers come from training images
    val_path: Optional[str] = None
    val_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: Seed = 0  # the train/val split is fixed by this seed, not by the run seed
    image_size: int = Field(32, ge=8, le=MAX_IMAGE_SIZE)
    num_workers: int = Field(0, ge=0)
    # decode a large JPEG at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling) when the random crop (the eval
    # resize) still gets at least its output resolution from it; the crop box is drawn on the full size
    jpeg_draft: bool = True
    # libjpeg's inverse DCT: "fast" (JDCT_IFAST) is TF decode_jpeg's default, so the TF recipe's pixels;
    # "accurate" (JDCT_ISLOW) is PIL's, within 4/255 of it and 5% slower to decode
    jpeg_dct: Literal["fast", "accurate"] = "fast"
    # tf: TF's EfficientNet input pipeline (tensorflow/tpu preprocessing.py), reproduced: its crop sampler
    # (sample_distorted_bounding_box, crops of at least 10%, its fallback to the eval crop), its eval crop
    # (crop, then resize), its legacy bicubic resize (a = -0.75, no antialiasing) for both, and its 0-bit
    # Posterize ({0, 128}). torchvision: RandomResizedCrop, resize-then-center-crop, antialiased bicubic
    # (what the notes' PyTorch runs used), and timm's Posterize (0 bits: a black image).
    pipeline: Literal["torchvision", "tf"] = "torchvision"
    # -- train augmentation, in this order: [AA], random-resized-crop, flip, [AA], color jitter;
    #    random erasing runs later, on the normalized batch (see trainer/data/batch_augment.py)
    # random-resized-crop area fraction and aspect ratio; TF: area (0.08, 1), aspect (3/4, 4/3)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # flip probability, drawn per sample (a flip applied to every image is no augmentation); digits must not be flipped
    hflip: float = Field(0.5, ge=0, le=1)
    # timm policy string: AutoAugment "original", "v0", "v0r", "originalr", "3a" (+ "-mstd0.5"),
    # RandAugment "rand-m9-mstd0.5", ...; None = off. TF's EfficientNet recipe uses AutoAugment "v0"
    auto_augment: Optional[str] = None
    # notes part 4: TF runs AA after crop and flip; "also try AutoAugment before the random crop"
    aa_order: Literal["after_crop", "before_crop"] = "after_crop"
    # AA/RA translate range as a fraction of image_size (timm: 0.45); TF uses 250 px whatever the size
    aa_translate_pct: float = Field(0.45, ge=0)
    # AA's rotate/shear/translate resampling: TF's AutoAugment (tf.contrib.image's rotate and transform)
    # samples "nearest"; "random" is timm's default, bilinear or bicubic drawn per op
    aa_interpolation: Literal["nearest", "bilinear", "bicubic", "random"] = "nearest"
    # brightness/contrast/saturation factor (timm's --color-jitter); TF has none, notes row 39 tries 0.4.
    # Unlike timm, it is not dropped when auto_augment is set: a set value is never silently ignored
    color_jitter: float = Field(0.0, ge=0)
    # random erasing probability per sample (timm's --reprob; notes row 39: 0.2) and timm's fill mode
    random_erasing: float = Field(0.0, ge=0, le=1)
    erasing_mode: Literal["const", "rand", "pixel"] = "pixel"
    # -- train and eval: the resampling filter (never PIL's default), and the eval crop
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    # eval: resize the short side to image_size / crop_pct, center crop image_size (TF: crop/(crop + 32))
    crop_pct: float = Field(0.875, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if self.image_size / self.crop_pct > MAX_IMAGE_SIZE:  # the eval resize
            raise ValueError(f"crop_pct {self.crop_pct:g} resizes to image_size / crop_pct = "
                             f"{self.image_size / self.crop_pct:.3g} px, past {MAX_IMAGE_SIZE}")
        tf_crop = (tuple(self.crop_scale), tuple(self.crop_ratio), self.interpolation) == ((0.08, 1.0), (0.75, 4 / 3),
                                                                                            "bicubic")
        if self.pipeline == "tf" and not tf_crop:  # a set value is never silently ignored
            raise ValueError("pipeline tf crops and resizes as TF does (area (0.08, 1), aspect (3/4, 4/3), bicubic): "
                             "leave crop_scale, crop_ratio and interpolation at those, or use pipeline torchvision")
        # source=imagefolder without data.path loads (a recipe names no machine's folder): the data
        # build refuses it, before anything is written (trainer/data/loaders.py build_loaders)
        return self

    @field_validator("auto_augment")
    @classmethod
    def _aa_parses(cls, policy: Optional[str]) -> Optional[str]:
        if policy is not None:
            from .data.augment import build_auto_augment  # timm and torch: loaded only when a policy is set

            # build it: a policy string that does not parse fails here, at load, not in a worker mid-run
            build_auto_augment(policy, image_size=224, translate_pct=0.45, interpolation="nearest", tf_posterize=False)
        return policy


class ModelConfig(Section):
    name: str = "efficientnet_b0"
    drop_rate: float = Field(0.2, ge=0, lt=1)
    drop_path_rate: float = Field(0.2, ge=0, lt=1)
    # TF's BN momentum (0.99 = keep 99% of the running stat); torch's momentum is 1 - this.
    bn_momentum: float = Field(0.99, gt=0, lt=1)
    bn_eps: float = Field(1e-3, gt=0)
    # timm: timm's own init (for its EfficientNets already TF's formulas); tf: TF's conv/dense
    # init applied by us (normal std sqrt(2/fan_out), dense uniform +-1/sqrt(out)); torch: PyTorch
    # module defaults (kaiming-uniform), the init the notes ran before "TF-style init" (rows 19-24).
    init: Literal["timm", "tf", "torch"] = "timm"
    # TF's (and timm's) classifier init is uniform +-1/sqrt(classes): at 10 classes a fresh B0's
    # logits have a std of ~4 and the first loss is ~5.7, ten times ImageNet's logit scale. Set
    # 1000 to give a small-class proxy ImageNet's classifier scale; None: the real class count.
    # PyTorch's default init (+-1/sqrt(features)) does not depend on the class count: no effect there.
    head_init_classes: Optional[int] = Field(None, ge=1)
    # notes row 42: gamma of the projection BN of every residual MBConv block starts at 0
    zero_init_last_bn: bool = False
    # notes row 34 (a bug, kept to reproduce it): the block's activation after the projection BN
    act_after_projection: bool = False
    # BN statistics over the global batch (all ranks) instead of each rank's micro batch; converted
    # in build_model, so before the EMA copy, the optimizer and the engine (trainer/syncbn.py)
    sync_bn: bool = False


class OptimConfig(Section):
    # rmsproptf: TF's RMSProp (square average starts at 1, eps inside the sqrt, lr inside the
    # momentum buffer); rmsprop: torch.optim.RMSprop, the one that blew up in notes rows 14-18
    name: Literal["sgd", "rmsproptf", "rmsprop", "adamw"] = "sgd"
    # lr for a global batch of lr_base_batch images; scaled to the real *global* batch
    # (world size x micro batch x accumulation), never the per-GPU one
    lr: float = Field(0.1, gt=0)
    lr_base_batch: int = Field(256, ge=1)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"  # notes part 4: linear or sqrt?
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd, rmsproptf, rmsprop; adamw keeps betas (0.9, 0.999)
    nesterov: bool = False  # sgd only; timm's "sgd" silently means Nesterov, ours never does
    # rmsprop*: TF's epsilon 1e-3 (TF's default is 1e-10); adamw 1e-8. When absent it is filled in
    # from `name` at load, so the saved config always shows the value used.
    eps: float = Field(1e-3, gt=0)
    alpha: float = Field(0.9, gt=0, lt=1)  # RMSProp square-average decay: TF's `decay` 0.9 (torch's default 0.99)
    weight_decay: float = Field(1e-5, ge=0)
    # coupled: wd*p added to the gradient inside the optimizer; decoupled: p -= wd*p every step,
    # no lr factor; decoupled_lr: p -= lr*wd*p (AdamW's form); l2_loss: TF's wd * sum(||w||^2)/2
    # added to the loss (same gradient as coupled, but it passes through clipping and loss scaling)
    wd_form: Literal["coupled", "decoupled", "decoupled_lr", "l2_loss"] = "coupled"
    # which tensors decay: all; no_conv_bias; weights_only (no bias anywhere, BN gamma decays);
    # no_bn: every tensor except BN ones, biases included (TF's rule). BN is found by module type.
    wd_params: Literal["all", "no_conv_bias", "weights_only", "no_bn", "no_bn_no_bias"] = "no_bn"

    @model_validator(mode="before")
    @classmethod
    def _default_eps(cls, data):
        if isinstance(data, dict) and "eps" not in data:
            data = {**data, "eps": 1e-8 if data.get("name") == "adamw" else 1e-3}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.nesterov and self.name != "sgd":
            raise ValueError(f"optim.nesterov=true applies only to sgd, not {self.name}")
        if self.name == "adamw" and self.wd_form == "coupled" and self.weight_decay > 0:
            raise ValueError("adamw with wd_form=coupled is Adam with L2, not AdamW; "
                             "use wd_form=decoupled_lr (torch AdamW) or decoupled")
        return self


class ScheduleConfig(Section):
    # tf_staircase: TF's lr * rate^floor(step / (decay_epochs * steps_per_epoch)) over optimizer
    # steps, stairs at fractional epochs; exp_epoch: the same decay stepped once per whole epoch
    # (timm's per-epoch step scheduler: a stair every 2.4 epochs lands on epochs 3, 5, 8, 10, ...);
    # cosine: to min_lr, reached exactly at the last step; constant: peak after warmup.
    name: Literal["tf_staircase", "exp_epoch", "cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    # linear: start + (peak - start) * t; exponential: start^(1-t) * peak^t (t = step / warmup steps)
    warmup_form: Literal["linear", "exponential"] = "linear"
    # as a fraction of the peak lr; exponential warmup from 0 is refused (0^x stays 0: notes row 17)
    warmup_start_lr: float = Field(0.0, ge=0, le=1, validate_default=True)
    # true: the decay clock counts from step 0, warmup included (TF); false: it starts when warmup
    # ends (the other code base; notes row 40)
    warmup_in_decay_clock: bool = True
    min_lr: float = Field(0.0, ge=0, le=1)  # cosine floor, as a fraction of the peak lr
    decay_rate: float = Field(0.97, gt=0, le=1)  # tf_staircase, exp_epoch
    decay_epochs: float = Field(2.4, gt=0)  # tf_staircase, exp_epoch

    @field_validator("warmup_start_lr")
    @classmethod
    def _no_exponential_warmup_from_zero(cls, value: float, info: ValidationInfo) -> float:
        if value == 0 and info.data.get("warmup_form") == "exponential" and info.data.get("warmup_epochs", 0) > 0:
            raise ValueError("exponential warmup from 0 stays at 0 (0^x = 0) until it jumps to the peak "
                             "(notes row 17); set warmup_start_lr > 0 or warmup_form=linear")
        return value


class TrainConfig(Section):
    """How long, how big a batch, how often to log and evaluate."""
    epochs: float = Field(10, gt=0)
    # lengths in epochs (train.epochs, the schedule's warmup and decay) count epochs of
    # epoch_scale x the data: a recipe's schedule, shape kept, in fewer passes (the notes' 350-epoch
    # rows swept on a small data set). Eval and checkpoint intervals stay in passes over the data.
    epoch_scale: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)  # stop after this many optimizer steps
    micro_batch: int = Field(64, ge=1)  # per process, per forward
    grad_accum: int = Field(1, ge=1)
    # the global batch, stated instead of grad_accum: accumulation = global_batch / (world x micro_batch),
    # which must divide; the lr then scales with this batch whatever the machine (trainer/plan.py)
    global_batch: Optional[int] = Field(None, ge=1)
    eval_every_epochs: float = Field(1.0, gt=0)
    log_every_steps: int = Field(10, ge=1)
    # a collective that waits longer than this raises on every rank still alive (a dead or stuck
    # rank then ends the run with an error instead of a hang); it also bounds the slowest rank's
    # checkpoint or evaluation, so leave minutes on a real run
    collective_timeout_s: float = Field(1800.0, gt=0, le=LONGEST_TIMEOUT_S)

    @model_validator(mode="after")
    def _one_way_to_accumulate(self):
        if self.global_batch is not None and self.grad_accum != 1:
            raise ValueError("set train.global_batch or train.grad_accum, not both "
                             "(accumulation is derived from the global batch)")
        return self


class EngineConfig(Section):
    """The DeepSpeed engine: precision, ZeRO, clipping, and when a run counts as collapsed."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # DeepSpeed refuses fp16 on a CPU without fast fp16 kernels; this lets it run there (slowly)
    allow_cpu_fp16: bool = False
    zero_stage: Literal[0, 1, 2] = 0
    grad_clip: float = Field(0.0, ge=0)  # 0 = off; DeepSpeed clips the unscaled gradients
    # a DeepSpeed JSON; the trainer fills in batch, clipping, precision and ZeRO stage (ds_configs/README.md)
    ds_config: str = "ds_configs/base.json"
    # a run whose steps keep being skipped for non-finite gradients has collapsed: stop it
    max_consecutive_skips: int = Field(25, ge=1)


class CompileConfig(Section):
    # off; model: torch.compile of the model in place (nn.Module.compile: checkpoints keep their keys);
    # engine: DeepSpeed's engine.compile() (the same in-place compile, or DeepCompile when ds_config
    # enables it). Train and eval each compile once; recompilations are counted in the metrics.
    target: Literal["off", "model", "engine"] = "off"
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # NHWC inputs, so activations are NHWC end to end (cuDNN's fast tensor-core kernels in fp16/bf16).
    # The weights stay NCHW: DeepSpeed's initial broadcast views each parameter as bytes (refused for
    # a channels_last tensor) and ZeRO 1/2 flatten them; a convolution converts its small weight itself.
    channels_last: bool = False
    _yaml_off = field_validator("target", mode="before")(lambda value: yaml_off(value))


class EmaConfig(Section):
    decay: float = Field(0.9999, ge=0, le=1)
    # how the decay ramps up early in the run: none (flat); timm (ModelEmaV3's warmup);
    # tf (TF's ExponentialMovingAverage with num_updates: min(decay, (1 + n) / (10 + n)))
    warmup: Literal["none", "timm", "tf"] = "none"


class CheckpointConfig(Section):
    every_epochs: float = Field(1.0, gt=0)
    keep: int = Field(2, ge=1)  # the newest checkpoints kept, besides the best
    # also keep the checkpoint with the best val top-1 of the EMA (ema_top1) or of the model (top1),
    # never pruned; a new best writes a checkpoint at that evaluation (checkpoints/best.json names it)
    keep_best: Literal["none", "top1", "ema_top1"] = "ema_top1"


# Settings that were once all under `train`: a recipe, an override or the config.yaml of a run made
# by an earlier trainer may still say them so; they are moved to their section before validation.
LEGACY_KEYS = {
    "train.precision": "engine.precision", "train.allow_cpu_fp16": "engine.allow_cpu_fp16",
    "train.zero_stage": "engine.zero_stage", "train.grad_clip": "engine.grad_clip",
    "train.ds_config": "engine.ds_config", "train.max_consecutive_skips": "engine.max_consecutive_skips",
    "train.compile": "compile.target", "train.compile_mode": "compile.mode",
    "train.channels_last": "compile.channels_last",
    "train.ema_decay": "ema.decay", "train.ema_warmup": "ema.warmup",
    "train.checkpoint_every_epochs": "checkpoint.every_epochs", "train.keep_checkpoints": "checkpoint.keep",
    "train.keep_best": "checkpoint.keep_best",
}


def move_legacy_keys(tree: dict) -> dict:
    """A config tree with every LEGACY_KEYS setting moved to its section (a copy; the new key wins)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for old, new in LEGACY_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = tree.get(old_section)
        if isinstance(section, dict) and old_key in section:
            value = section.pop(old_key)
            target = tree.setdefault(new_section, {})
            if isinstance(target, dict):
                if target.get(new_key, value) != value:
                    raise ConfigError(f"{old} ({value!r}) and {new} ({target[new_key]!r}) both set; {new} is "
                                      f"its name now")
                target[new_key] = value
    return tree


class WandbConfig(Section):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "efficientnet-repro"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: tuple[str, ...] = ()
    # how long wandb.init waits for the server before the run falls back to offline logging
    init_timeout_s: float = Field(60.0, gt=0, le=LONGEST_TIMEOUT_S)


class LossConfig(Section):
    # TF: targets = onehot * (1 - eps) + eps / classes, applied with or without mixup (code that smooths
    # only inside its mixup path silently trains unsmoothed without it); 0 = plain cross-entropy (notes row 28)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # log_softmax: computed in fp32, finite whatever the logits' dtype (notes row 6);
    # log_of_softmax_unstable: the notes' broken v2, log(softmax(x)) in the logits' dtype: inf in fp16 (row 5)
    smoothing_impl: Literal["log_softmax", "log_of_softmax_unstable"] = "log_softmax"


class MixupConfig(Section):
    # off; tf: TF reference, a lambda per sample, lambda = max(lambda, 1 - lambda), partner = the reversed
    # batch; batch / pair: timm's Mixup modes (one lambda per batch / per pair i, n-1-i), with cutmix
    mode: Literal["off", "tf", "batch", "pair"] = "off"
    alpha: float = Field(0.2, ge=0)  # mixup lambda ~ Beta(alpha, alpha); TF's --mixup_alpha
    cutmix_alpha: float = Field(0.0, ge=0)  # timm modes only (TF has no cutmix); 0 = no cutmix
    prob: float = Field(1.0, ge=0, le=1)  # timm modes: chance a batch (pair) is mixed at all; TF mixes all
    switch_prob: float = Field(0.5, ge=0, le=1)  # timm modes, both alphas > 0: chance of cutmix over mixup

    _yaml_off = field_validator("mode", mode="before")(lambda value: yaml_off(value))

    @model_validator(mode="after")
    def _check(self):
        if self.mode in ("off", "tf") and self.cutmix_alpha > 0:
            raise ValueError(f"cutmix_alpha needs mode batch or pair (mode is {self.mode})")
        if self.mode == "tf" and (self.alpha <= 0 or self.prob != 1.0):
            raise ValueError("mode tf needs alpha > 0 and mixes every batch (prob 1)")
        if self.mode in ("batch", "pair") and self.alpha <= 0 and self.cutmix_alpha <= 0:
            raise ValueError(f"mode {self.mode} needs alpha > 0 or cutmix_alpha > 0")
        return self


class Config(Section):
    recipe: str
    variant: Optional[str] = None
    name: str  # run name; the default run directory is runs/<name>/
    seed: Seed = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    engine: EngineConfig = EngineConfig()
    compile: CompileConfig = CompileConfig()
    ema: EmaConfig = EmaConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    loss: LossConfig = LossConfig()
    mixup: MixupConfig = MixupConfig()
    wandb: WandbConfig = WandbConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe(name: str) -> dict[str, Any]:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(available_recipes())}")
    tree = yaml.safe_load(path.read_text()) or {}
    base = tree.pop("base", None)  # a recipe may be another recipe plus a few changed fields
    if base is not None:
        inherited = {k: v for k, v in read_recipe(base).items() if k not in ("description", "variants")}
        tree = deep_merge(inherited, tree)
    return tree


class OverrideLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans, true and false only. YAML 1.1 also reads yes, no, on and off as
    booleans, which made data.path=no or model.name=on a boolean; a boolean setting still takes them
    as text (compile.channels_last=on, engine.allow_cpu_fp16=yes)."""


OverrideLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
OverrideLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                     list("tTfF"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=0.1` -> (["train", "lr"], 0.1); the value is read as YAML (OverrideLoader's)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value (for example train.epochs=5)")
    try:
        return key.split("."), yaml.load(value, Loader=OverrideLoader) if value != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not YAML ({err.problem or err}); quote it") from None


def set_dotted(tree: dict, path: list[str], value: Any, full_key: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{full_key}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def deep_merge(base: dict, overlay: dict) -> dict:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(recipe: str, overrides: list[str] = (), variant: Optional[str] = None) -> Config:
    """Recipe, then variant, then overrides; raise ConfigError naming the first bad key."""
    tree = read_recipe(recipe)
    tree.pop("description", None)
    variants = tree.pop("variants", {}) or {}
    tree = move_legacy_keys(tree)
    if variant is not None:
        if variant not in variants:
            names = ", ".join(variants) or "none"
            raise ConfigError(f"recipe {recipe!r} has no variant {variant!r}; available: {names}")
        tree = deep_merge(tree, move_legacy_keys({k: v for k, v in variants[variant].items() if k != "meta"}))
    tree.setdefault("recipe", recipe)
    tree["variant"] = variant
    tree.setdefault("name", recipe if variant is None else f"{recipe}-{variant.replace('/', '-')}")
    return validated(tree, overrides)


def validated(tree: dict, overrides: list[str] = ()) -> Config:
    """A config tree (a recipe's, or a run's saved config.yaml) with `key=value` overrides applied."""
    tree = move_legacy_keys(tree)
    for text in overrides:
        path, value = parse_override(text)
        path = LEGACY_KEYS.get(".".join(path), ".".join(path)).split(".")
        set_dotted(tree, path, value, text.partition("=")[0])
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err)) from None


def describe_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown config key {key!r}"
    shown = first["type"] != "missing" and not isinstance(first.get("input"), (dict, type(None)))
    got = f" (got {first['input']!r})" if shown else ""
    if first["type"] == "string_type" and shown and not isinstance(first["input"], (list, tuple)):
        # YAML read the text as another type (true, 2024, 1e3, 2024-01-01): quoted, it stays text
        text = str(first["input"]).lower() if isinstance(first["input"], bool) else str(first["input"])
        whole = not isinstance(first["loc"][-1], int)  # the setting itself, not an item of a list
        got += "; quote it to mean the text: " + (f"{key}=\"'{text}'\"" if whole else f"'{text}'")
    return f"config key {key!r}: {first['msg'].removeprefix('Value error, ')}{got}"


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
