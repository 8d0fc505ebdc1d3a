"""`python -m trainer eval`: top-1, top-5 and loss of a run's checkpoint (model and EMA) or of a plain
weights file, on any validation source, with the recipe's eval transform. Under the `deepspeed`
launcher each rank evaluates its shard and every image counts once.

    python -m trainer eval --run-dir runs/b0 --checkpoint best data.val_path=/data/imagenet/val
    python -m trainer eval --weights runs/b0/ema.safetensors --recipe tf_efficientnet_b0 \\
        data.val_path=/data/imagenet/val
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch

from .. import checkpoint
from ..config import Config, ConfigError, load_config, validated
from ..data.loaders import Split, open_path, split_sources, val_loader
from ..distributed import init_distributed
from ..evaluate import evaluate
from ..export import load_weights
from ..model import build_model
from ..track import read_config, write_json_atomic

MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file: the module's weights and our client state


def resolve_tag(ckpt_dir: Path, which: str) -> str:
    """latest, best (checkpoint.keep_best's) or a tag such as step00001234; complete checkpoints only."""
    if which == "latest":
        tag = checkpoint.latest_tag(ckpt_dir)
    elif which == "best":
        best = checkpoint.best_checkpoint(ckpt_dir)
        tag = best["tag"] if best else None
    else:
        tag = which if checkpoint.is_complete(ckpt_dir / which) else None
    if tag is None:
        raise ConfigError(f"--checkpoint {which}: no such complete checkpoint in {ckpt_dir}")
    return tag


def checkpoint_weights(run_dir: Path, which: str) -> tuple[str, dict[str, dict]]:
    """The model's and the EMA's weights from a run's checkpoint, without DeepSpeed."""
    ckpt_dir = run_dir / "checkpoints"
    tag = resolve_tag(ckpt_dir, which)
    state = torch.load(ckpt_dir / tag / MODEL_STATES, map_location="cpu", weights_only=False)
    ema = {name.removeprefix("module."): tensor for name, tensor in state["ema"].items()}  # timm's EMA wrapper
    return tag, {"model": state["module"], "ema": ema}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """load_weights, with a file that is not a state dict refused in one line."""
    try:
        weights = load_weights(path)
    except Exception as err:  # torch.load and safetensors raise many types for a foreign file (KeyError, EOFError)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"--weights {path}: not a state dict that torch or safetensors can read "
                          f"({type(err).__name__}{': ' + detail if detail else ''})") from None
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise ConfigError(f"--weights {path}: not a state dict (a mapping of names to tensors)")
    return weights


def check_writable(out: Path) -> None:
    """Make and remove a file beside `out`: an unwritable --out is refused before the evaluation, not after it."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the JSON file to write")
    try:
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write in {out.parent}: {err.strerror or err}") from None


def fit_weights(model: torch.nn.Module, weights: dict, what: str, cfg: Config, classes: int) -> None:
    """load_state_dict, with a one-line refusal that says what does not fit (another architecture, or
    another number of classes) instead of torch's page of keys."""
    ours = model.state_dict()
    missing, unexpected = ours.keys() - weights.keys(), weights.keys() - ours.keys()
    if missing or unexpected:
        raise ConfigError(f"{what} do not fit {cfg.model.name}: {len(missing)} of its tensors missing (e.g. "
                          f"{sorted(missing)[:1]}), {len(unexpected)} unknown (e.g. {sorted(unexpected)[:1]}); "
                          f"another architecture? set model.name")
    for name, tensor in weights.items():
        if tensor.shape != ours[name].shape:
            raise ConfigError(f"{what} do not fit {cfg.model.name} with {classes} classes: {name} is "
                              f"{list(tensor.shape)} there, {list(ours[name].shape)} here"
                              f"{' (another number of classes)' if 'classifier' in name else ''}")
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in weights.items()})


def eval_config(run_dir: Optional[Path], recipe: Optional[str], overrides: list[str]) -> Config:
    if run_dir is not None:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--run-dir {run_dir}: no run there (no config.yaml)")
        return validated(read_config(run_dir), overrides)
    return load_config(recipe or "demo", overrides)


def evaluate_weights(run_dir: Optional[Path], which: str, weights_file: Optional[Path], recipe: Optional[str],
                     overrides: list[str], out: Optional[Path]) -> dict:
    cfg = eval_config(run_dir, recipe, overrides)
    dist = init_distributed(cfg.train.collective_timeout_s)
    if weights_file is not None:
        if not weights_file.is_file():
            raise ConfigError(f"--weights {weights_file}: no such file")
        label, sets = weights_file.name, {"weights": read_weights(weights_file)}
    else:
        label, sets = checkpoint_weights(run_dir, which)
    out = out or (run_dir / f"eval-{label}.json" if run_dir else
                  weights_file.with_name(f"{weights_file.stem}-eval.json"))
    if dist.is_main:
        check_writable(out)
    if cfg.data.val_path and not cfg.data.path:  # a validation tree alone: its own classes
        val = open_path(cfg.data.val_path, lmdb=Path(cfg.data.val_path).is_file())
        split = Split(val, [], val, list(range(len(val))), f"data.val_path {cfg.data.val_path} ({len(val)} images)")
    else:
        split = split_sources(cfg.data)
    loader = val_loader(split, cfg.data, cfg.train.micro_batch, cfg.seed, dist.rank, dist.world_size)
    classes = len(split.val.classes)
    device = dist.device()
    result = {"evaluated": str(weights_file or run_dir / "checkpoints" / label), "validation": split.description}
    for name, weights in sets.items():
        model = build_model(cfg.model, classes)
        fit_weights(model, weights, f"the weights of {label}" if name == "weights" else f"the {name} weights of {label}",
                    cfg, classes)
        scores = evaluate(model.to(device), loader, device, torch.float32, f"eval {name}", dist.is_main,
                          cfg.compile.channels_last)
        result[name] = {k: scores[k] for k in ("top1", "top5", "loss")}
        result["images"] = scores["images"]
    if dist.is_main:
        for name in sets:
            scores = result[name]
            print(f"{name}: top1 {scores['top1']:.2f} top5 {scores['top5']:.2f} loss {scores['loss']:.4f} "
                  f"({result['images']} images; {split.description})")
        write_json_atomic(out, result)
        print(f"wrote {out}")
    return result
