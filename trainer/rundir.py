"""Choosing and claiming the run directory, agreed by all ranks; rank 0 holds its lock
(trainer/runlock.py) for the whole run."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import latest_tag
from .config import Config, ConfigError
from .distributed import multi_rank
from .runlock import LOCK_NAME, RunDirBusy, RunLock, acquire, check_not_held
from .track import read_config


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


# settings a resumed run may change: where it logs and how it executes, not what it computes (data
# order, augmentation and dropout numbers do not depend on the workers; evaluation changes no weight)
MAY_CHANGE_ON_RESUME = {"wandb": None, "compile": None, "data": ("num_workers",),
                        "train": ("log_every_steps", "eval_every_epochs", "collective_timeout_s"),
                        "checkpoint": ("every_epochs", "keep", "keep_best")}


# the batch: a resume may change it only when asked (--change-batch), which recomputes the schedule and
# data position (plan.rebatch); the world size, the batch's third factor, is not in the config
BATCH_SETTINGS = ("train.micro_batch", "train.grad_accum", "train.global_batch")


def _comparable(config: dict) -> dict:
    kept = {k: v for k, v in config.items() if k not in MAY_CHANGE_ON_RESUME or MAY_CHANGE_ON_RESUME[k]}
    for section, keys in MAY_CHANGE_ON_RESUME.items():
        if keys and isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k not in keys}
    return kept


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(saved: dict, cfg: Config, change_batch: bool = False) -> list[str]:
    """The settings in which this run differs from the saved one, one 'key: there, here' each."""
    there, here = _flat(_comparable(saved)), _flat(_comparable(cfg.to_dict()))
    ignored = BATCH_SETTINGS if change_batch else ()
    differences = []
    for key in sorted((there.keys() | here.keys()) - set(ignored)):
        if key not in there:
            differences.append(f"{key}: absent there (an older trainer made the run), {here[key]!r} here")
        elif key not in here:
            differences.append(f"{key}: {there[key]!r} there, not a setting of this trainer")
        elif there[key] != here[key]:
            differences.append(f"{key}: {there[key]!r} there, {here[key]!r} here")
    return differences


def _check(cfg: Config, run_dir: Path, resume: Optional[str], change_batch: bool = False) -> Optional[str]:
    """None if this run may use run_dir, else the reason it may not."""
    if run_dir.exists() and not run_dir.is_dir():
        return f"run directory {run_dir} is a file, not a directory"
    saved_config = run_dir / "config.yaml"
    has_checkpoint = latest_tag(run_dir / "checkpoints") is not None
    if saved_config.exists():
        try:
            saved = read_config(run_dir)
        except ConfigError as err:  # returned, not raised: the other ranks wait for rank 0's answer
            return f"run directory {run_dir}: {err}"
        differences = _differences(saved, cfg, change_batch)
        if resume is None and (has_checkpoint or differences):
            return (f"run directory {run_dir} already holds a run; pass --resume to continue it "
                    f"or choose another --run-dir")
        if differences:
            batch = any(d.startswith(BATCH_SETTINGS) for d in differences)
            return (f"run directory {run_dir} holds a run with a different config ({'; '.join(differences)}); "
                    f"resume with the same settings{' (or pass --change-batch for another batch)' if batch else ''}")
        # resumed, or the same run stopped before its first checkpoint (a signal during start-up, a
        # kill): it starts again from step 0, a plain rerun as much as --resume
        return None
    if resume == "required":
        return f"--resume: {run_dir} holds no run to resume"
    # a lock file alone is a run that died before it wrote anything: the directory may be reused
    if run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        return f"run directory {run_dir} is not empty and holds no run"
    return None


def _make_writable(run_dir: Path) -> Optional[str]:
    """Create run_dir and try a file in it: None, or why it cannot hold a run (a read-only filesystem,
    a path through a file, /proc), found before a checkpoint is restored or anything is written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as err:
        return f"run directory {run_dir} cannot be written: {err.strerror or err}"
    return None


def _claim(cfg: Config, run_dir: Path, resume: Optional[str], change_batch: bool
           ) -> tuple[Optional[RunLock], Optional[str]]:
    """Rank 0: (the held lock, None), or (None, why not). Writes nothing unless the run may go on."""
    try:
        check_not_held(run_dir)  # first: a live owner is the reason, whatever its files say yet
    except RunDirBusy as busy:
        return None, str(busy)
    error = _check(cfg, run_dir, resume, change_batch) or _make_writable(run_dir)
    if error is not None:
        return None, error
    try:
        lock = acquire(run_dir)
    except RunDirBusy as busy:  # another process took it since check_not_held
        return None, str(busy)
    # again, as the owner: that process may have written a run since
    error = _check(cfg, run_dir, resume, change_batch)
    if error is not None:
        lock.release()
        return None, error
    return lock, None


def claim_run_dir(cfg: Config, run_dir: Optional[Path], resume: Optional[str], dist, change_batch: bool = False
                  ) -> tuple[Path, RunLock]:
    """Rank 0 picks the directory (a default name carries a timestamp), checks it and locks it;
    every rank then uses rank 0's answer, or raises rank 0's error (RunDirBusy included: a
    ConfigError, so the CLI prints one line and exits 2). change_batch: the saved config may differ
    in BATCH_SETTINGS.

    Returns (run_dir, lock). The caller releases the lock when the run ends, `lock.release()`
    on every rank (a no-op on ranks other than 0); the kernel releases it if the process dies."""
    answer, lock = [None, None], RunLock()
    if dist.is_main:
        run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
        held, error = _claim(cfg, run_dir, resume, change_batch)
        lock = held or lock
        answer = [str(run_dir), error]
    if multi_rank():
        torch.distributed.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise ConfigError(answer[1])
    return Path(answer[0]), lock
