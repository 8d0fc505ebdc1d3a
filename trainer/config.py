"""The run configuration: one typed tree, loaded from a recipe, overlaid with a
variant and `key=value` overrides, validated, then frozen.

Each section is its own model so that a factory takes only its section
(`build_model(cfg.model)`), never the whole tree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A configuration the trainer refuses; the CLI prints it on one line and exits 2."""


class Section(BaseModel):
    # extra="forbid": an unknown or misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class DataConfig(Section):
    source: Literal["digits", "imagefolder"] = "digits"
    path: Optional[str] = None  # ImageFolder root (class folders) for source=imagefolder
    val_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0  # the train/val split is fixed by this seed, not by the run seed
    image_size: int = Field(32, ge=8)
    num_workers: int = Field(0, ge=0)
    # random-resized-crop scale range; flip probability (digits must not be flipped)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = Field(0.5, ge=0, le=1)
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    crop_pct: float = Field(0.875, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.source == "imagefolder" and not self.path:
            raise ValueError("source=imagefolder needs data.path")
        return self


class ModelConfig(Section):
    name: str = "efficientnet_b0"
    drop_rate: float = Field(0.2, ge=0, lt=1)
    drop_path_rate: float = Field(0.2, ge=0, lt=1)
    # TF's BN momentum (0.99 = keep 99% of the running stat); torch's momentum is 1 - this.
    bn_momentum: float = Field(0.99, gt=0, lt=1)
    bn_eps: float = Field(1e-3, gt=0)


class OptimConfig(Section):
    name: Literal["sgd", "rmsproptf", "adamw"] = "sgd"
    # lr for a global batch of lr_base_batch images; scaled to the real global batch
    lr: float = Field(0.1, gt=0)
    lr_base_batch: int = Field(256, ge=1)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-5, ge=0)


class ScheduleConfig(Section):
    name: Literal["cosine", "tf_staircase", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_start_lr: float = Field(0.0, ge=0)  # as a fraction of the peak lr
    min_lr: float = Field(0.0, ge=0)  # cosine floor, as a fraction of the peak lr
    decay_rate: float = Field(0.97, gt=0, le=1)  # tf_staircase
    decay_epochs: float = Field(2.4, gt=0)  # tf_staircase


class TrainConfig(Section):
    epochs: float = Field(10, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)  # stop after this many optimizer steps
    micro_batch: int = Field(64, ge=1)  # per process, per forward
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(0.0, ge=0)  # 0 = off; DeepSpeed clips the unscaled gradients
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[0, 1, 2] = 0
    ds_config: str = "ds_configs/base.json"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema_decay: float = Field(0.9999, ge=0, le=1)
    ema_warmup: bool = False  # timm's EMA warmup: decay ramps up early in the run
    eval_every_epochs: float = Field(1.0, gt=0)
    log_every_steps: int = Field(10, ge=1)
    checkpoint_every_epochs: float = Field(1.0, gt=0)
    keep_checkpoints: int = Field(2, ge=1)


class WandbConfig(Section):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "efficientnet-repro"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: tuple[str, ...] = ()


class Config(Section):
    recipe: str
    variant: Optional[str] = None
    name: str  # run name; the default run directory is runs/<name>/
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    wandb: WandbConfig = WandbConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe(name: str) -> dict[str, Any]:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(available_recipes())}")
    return yaml.safe_load(path.read_text()) or {}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=0.1` -> (["train", "lr"], 0.1); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value (for example train.epochs=5)")
    return key.split("."), yaml.safe_load(value) if value != "" else None


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
    if variant is not None:
        if variant not in variants:
            names = ", ".join(variants) or "none"
            raise ConfigError(f"recipe {recipe!r} has no variant {variant!r}; available: {names}")
        tree = deep_merge(tree, {k: v for k, v in variants[variant].items() if k != "meta"})
    tree.setdefault("recipe", recipe)
    tree["variant"] = variant
    tree.setdefault("name", recipe if variant is None else f"{recipe}-{variant.replace('/', '-')}")
    for text in overrides:
        path, value = parse_override(text)
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
    got = f" (got {first['input']!r})" if first["type"] != "missing" and "input" in first else ""
    return f"config key {key!r}: {first['msg']}{got}"


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
