"""Checkpoints: DeepSpeed's (module, optimizer, ZeRO partitions) plus the trainer's
own state as client state, so one checkpoint is a complete resume unit."""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def saved_tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, is_main: bool) -> None:
    """All ranks call this (each writes its ZeRO partition); rank 0 prunes old ones."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag_for(step), client_state=client_state)
    if is_main:
        for old in saved_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag).is_dir():
            return tag
    return None


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return client_state
