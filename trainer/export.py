"""What a run leaves for use anywhere: its weights as plain timm state dicts in safetensors files
(`timm.create_model(name, num_classes=...)` then `load_state_dict` works without DeepSpeed or this
trainer), and the versions of the code that trained them."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 (floats), contiguous, on the CPU, no shared storage: what safetensors and any loader take.
    The keys are timm's: DeepSpeed, compile-in-place and the fp32 BatchNorm class change none."""
    return {name: (t.float() if t.is_floating_point() else t).detach().cpu().contiguous().clone()
            for name, t in module.state_dict().items()}


def save_weights(path: Path, module: nn.Module) -> None:
    """Atomic: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(plain_state_dict(module), str(tmp))
    os.replace(tmp, path)


def export_weights(run_dir: Path, model: nn.Module, ema_module: nn.Module, prefix: str = "") -> None:
    """<prefix>model.safetensors and <prefix>ema.safetensors in the run directory (rank 0)."""
    save_weights(run_dir / f"{prefix}model.safetensors", model)
    save_weights(run_dir / f"{prefix}ema.safetensors", ema_module)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or .pth/.pt (plain, or under 'state_dict', 'model' or 'module')."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def code_versions() -> dict:
    """The git commit the trainer ran from (and whether its tree had uncommitted changes) and the
    versions of the libraries that decide the numbers."""
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            **{name: version(name) for name in ("effnet-trainer", "torch", "timm", "deepspeed")}}
