"""Checkpoints: DeepSpeed's (module, optimizer, ZeRO partitions) plus the trainer's
own state as client state, so one checkpoint is a complete resume unit.

Written atomically, so a crash (kill -9, a full disk, a lost node) while saving
leaves the previous checkpoint intact and the one that resumes:

    checkpoints/.tmp-step00000123/   DeepSpeed writes here (all ranks), rank 0 adds
                                     manifest.json (every file and its size), fsyncs,
    checkpoints/step00000123/        then renames it into place (atomic on one filesystem),
    checkpoints/latest               then replaces `latest` (write latest.tmp, os.replace).

A tag directory counts only with a manifest whose files all have their sizes:
`latest_tag` skips anything else (a leftover .tmp-*, a truncated file) and falls
back to the newest complete tag. DeepSpeed's own `save_latest` writes `latest`
in place (open, write): a crash there leaves it empty, so we write it ourselves.

Kept: the last `keep` tags, plus the best by the configured metric
(checkpoint.keep_best), named in best.json and never pruned.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .distributed import barrier
from .track import write_text_atomic

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


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
    """Every step* directory, complete or not, oldest first (tags are zero-padded steps)."""
    return sorted(p.name for p in Path(ckpt_dir).glob("step*") if p.is_dir())


def is_complete(tag_dir: Path) -> bool:
    """Its manifest exists and every file it lists is there with its size."""
    try:
        files = json.loads((tag_dir / MANIFEST).read_text())["files"]
        return all((tag_dir / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_tags(ckpt_dir: Path) -> list[str]:
    return [tag for tag in saved_tags(ckpt_dir) if is_complete(Path(ckpt_dir) / tag)]


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag `latest` names if it is complete, else the newest complete tag, else None."""
    ckpt_dir = Path(ckpt_dir)
    try:
        named = (ckpt_dir / "latest").read_text().strip()
    except OSError:
        named = ""
    if named and not named.startswith(".") and is_complete(ckpt_dir / named):
        return named
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def best_checkpoint(ckpt_dir: Path) -> Optional[dict]:
    """best.json: {"tag", "metric", "value", "step"} of the kept best checkpoint, or None."""
    try:
        return json.loads((Path(ckpt_dir) / "best.json").read_text())
    except (OSError, ValueError):
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, is_main: bool,
         best: Optional[dict] = None) -> str:
    """All ranks call this (each writes its ZeRO partition); rank 0 commits and prunes.
    best: {"metric", "value"} when this checkpoint is the new best to keep. Returns the tag."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    if is_main:  # leftovers of a crashed save; DeepSpeed's barrier below keeps other ranks out until then
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for prefix in (TMP_PREFIX, OLD_PREFIX):
            for stale in ckpt_dir.glob(prefix + "*"):
                shutil.rmtree(stale, ignore_errors=True)
    # save_latest=False: DeepSpeed would write `latest` in place; we replace it after the rename.
    # DeepSpeed ends with a barrier: every rank's files are written when it returns.
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    if is_main:
        _commit(ckpt_dir, tmp_tag, tag, step, best)
        _prune(ckpt_dir, keep)
    barrier()  # nobody moves on before the checkpoint is in place
    return tag


def _commit(ckpt_dir: Path, tmp_tag: str, tag: str, step: int, best: Optional[dict]) -> None:
    tmp_dir, final_dir = ckpt_dir / tmp_tag, ckpt_dir / tag
    files = {str(p.relative_to(tmp_dir)): p.stat().st_size for p in sorted(tmp_dir.rglob("*")) if p.is_file()}
    (tmp_dir / MANIFEST).write_text(json.dumps({"tag": tag, "step": step, "files": files}, indent=1) + "\n")
    # note: without these fsyncs the rename can reach the disk before the data it names
    for name in [*files, MANIFEST]:
        _fsync(tmp_dir / name)
    _fsync(tmp_dir)
    old = None
    if final_dir.exists():  # the same step saved again (resumed after a crash that followed this save)
        old = ckpt_dir / (OLD_PREFIX + tag)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync(ckpt_dir)
    write_text_atomic(ckpt_dir / "latest", tag)
    if best is not None:
        write_text_atomic(ckpt_dir / "best.json", json.dumps({"tag": tag, "step": step, **best}) + "\n")
    _fsync(ckpt_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete tags and the best; drop every other step* directory."""
    best = best_checkpoint(ckpt_dir)
    kept = set(complete_tags(ckpt_dir)[-keep:]) | ({best["tag"]} if best else set())
    for name in saved_tags(ckpt_dir):
        if name not in kept:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return client_state
