"""Checkpoints: DeepSpeed's (module, optimizer, ZeRO partitions) plus the trainer's
own state as client state, so one checkpoint is a complete resume unit.

Written atomically, so a crash (kill -9, a full disk, a lost node) while saving
leaves the previous checkpoint intact and the one that resumes:

    checkpoints/.tmp-step00000123/   DeepSpeed writes here (all ranks), rank 0 adds
                                     manifest.json (every file, its size and sha256), fsyncs,
                                     writes latest.tmp (and best.json.tmp),
    checkpoints/step00000123/        then renames the directory into place (atomic on one filesystem),
    checkpoints/latest               then renames latest.tmp over `latest`.

Everything that needs disk space is written before the first rename: a full disk (or a quota,
an I/O error) fails the save with `CheckpointWriteError` while nothing has been replaced; the
partial directory is removed (giving its space back, so the run can still write its summary),
and the previous checkpoint stays the one `latest` names. Note: torch.save reports a full disk
as a RuntimeError ("iostream error", "unexpected pos"), not as an OSError with its errno.

Two checks of a tag directory, for two purposes:
- listing (`is_complete`, `complete_tags`, `latest_tag`): a manifest whose files all have their
  sizes. Cheap (stat only); skips a leftover .tmp-* or a truncated file.
- loading (`verify`, `load_newest_intact`): also every file's sha256 against the manifest, which
  catches a file that kept its size but not its content (a bad disk block, a copy gone wrong).
  `load_newest_intact` falls back to the newest intact tag and says which one it skipped.
  A manifest without checksums (written before they existed) gets the size check only.
DeepSpeed's own `save_latest` writes `latest` in place (open, write): a crash there leaves it
empty, so we write it ourselves.

Kept: the last `keep` tags, plus the best by the configured metric
(checkpoint.keep_best), named in best.json and never pruned.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import traceback
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import log
from .config import ConfigError
from .distributed import multi_rank

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
PENDING_SUFFIX = ".tmp"  # latest.tmp, best.json.tmp: written before the commit, renamed at its end


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (full disk, quota, I/O error). Nothing of it is left, and
    the previous checkpoint is intact and still named by `latest`. The message is one line."""


class CheckpointsDamaged(ConfigError):
    """Every complete checkpoint of a run failed verification: nothing intact to resume from."""


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
    """Its manifest exists and every file it lists is there with its size (stat only: for listing;
    `verify` reads the contents before a load)."""
    try:
        files = json.loads((tag_dir / MANIFEST).read_text())["files"]
        return all((tag_dir / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose files all have their manifest sizes, oldest first (cheap: no file is read)."""
    return [tag for tag in saved_tags(ckpt_dir) if is_complete(Path(ckpt_dir) / tag)]


def _named_by_latest(ckpt_dir: Path) -> str:
    try:
        named = (ckpt_dir / "latest").read_text().strip()
    except OSError:
        return ""
    return "" if named.startswith(".") else named


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag `latest` names if it is complete, else the newest complete tag, else None.
    Sizes only: whether a run has something to resume from. Load with `load_newest_intact`."""
    ckpt_dir = Path(ckpt_dir)
    named = _named_by_latest(ckpt_dir)
    if named and is_complete(ckpt_dir / named):
        return named
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest would need Python 3.11; the project allows 3.10
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(tag_dir: Path) -> Optional[str]:
    """None if the checkpoint is intact, else what is wrong with it (one line). Reads every file:
    its sha256 must be the manifest's. A manifest without checksums gets the size check only."""
    if not is_complete(tag_dir):
        return "a file is missing or has another size than its manifest says"
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    for name, digest in sorted(manifest.get("sha256", {}).items()):
        try:
            if _sha256(tag_dir / name) != digest:
                return f"{name} kept its size but not its content (sha256 differs from {MANIFEST})"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
    return None


def _choose_intact(ckpt_dir: Path) -> tuple[Optional[str], list[str]]:
    """(the tag to load, one 'tag: problem' per damaged tag tried before it). The order is
    `latest_tag`'s: the tag `latest` names, then the complete tags newest first."""
    complete = complete_tags(ckpt_dir)
    named = _named_by_latest(ckpt_dir)
    order = ([named] if named in complete else []) + [tag for tag in reversed(complete) if tag != named]
    damaged = []
    for tag in order:
        problem = verify(ckpt_dir / tag)
        if problem is None:
            return tag, damaged
        damaged.append(f"{tag}: {problem}")
    return None, damaged


def load_newest_intact(engine, ckpt_dir: Path) -> Optional[tuple[str, dict]]:
    """Load the newest checkpoint that passes `verify`; (tag, client_state), or None when the run
    has no complete checkpoint. All ranks call it: rank 0 verifies (it reads every file once) and
    every rank loads the tag it chose. Skipping a damaged tag is said in one line on stderr;
    CheckpointsDamaged (a ConfigError) if every complete one is damaged: starting over would
    drop the run's metrics, so that is not done silently."""
    ckpt_dir = Path(ckpt_dir)
    multi = multi_rank()
    answer = [None, None]
    if not multi or torch.distributed.get_rank() == 0:
        tag, damaged = _choose_intact(ckpt_dir)
        if tag is None and damaged:
            answer = [None, f"every checkpoint in {ckpt_dir} is damaged ({'; '.join(damaged)}); "
                            f"nothing intact to resume from"]
        else:
            answer = [tag, None]
            if damaged:
                log.warning(f"checkpoint {'; '.join(damaged)}; resuming from {tag}, the newest intact one")
    if multi:
        torch.distributed.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise CheckpointsDamaged(answer[1])
    if answer[0] is None:
        return None
    return answer[0], load(engine, ckpt_dir, answer[0])


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
    """All ranks call this (each writes its ZeRO partition); rank 0 commits and prunes. step: the
    number that names the tag, the run's TrainState.steps_taken (it never goes back, so the newest
    checkpoint is the highest tag even after a batch change moved the schedule's step back).
    best: {"metric", "value"} when this checkpoint is the new best to keep. Returns the tag.
    Raises CheckpointWriteError when it cannot be written, with nothing of it left behind."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    if is_main:  # leftovers of a crashed save; DeepSpeed's barrier below keeps other ranks out until then
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for prefix in (TMP_PREFIX, OLD_PREFIX):
            for stale in ckpt_dir.glob(prefix + "*"):
                shutil.rmtree(stale, ignore_errors=True)
    error, cause = None, None
    try:
        # save_latest=False: DeepSpeed would write `latest` in place; we replace it after the rename.
        # DeepSpeed ends with a barrier: every rank's files are written when it returns. Note: a rank
        # whose write fails in there leaves the others in that barrier until the collective timeout.
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
        if is_main:
            _commit(ckpt_dir, tmp_tag, tag, step, best)
            _prune(ckpt_dir, keep)
    except (OSError, RuntimeError) as err:  # RuntimeError: torch.save's writer on a full disk
        reason = _write_failure(err, ckpt_dir)  # before the cleanup frees the space it looks at
        error, cause = f"checkpoint {tag} not written: {reason}", err
        _close_partial_files(err)
        if is_main:
            _discard(ckpt_dir, tmp_tag, tag)
        if not multi_rank():
            raise CheckpointWriteError(error) from err
    # every rank learns rank 0's outcome; this is also the barrier: nobody moves on before the checkpoint
    # is in place (or all stop, when rank 0 could not commit it)
    error = _rank0_says(error)
    if error is not None:
        raise CheckpointWriteError(error) from cause
    return tag


def _rank0_says(message: Optional[str]) -> Optional[str]:
    if not multi_rank():
        return message
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# when a write fails for lack of space the filesystem has less than a write buffer left
FULL_BELOW_BYTES = 16 << 20


def _write_failure(err: Exception, ckpt_dir: Path) -> str:
    """One line: why the write failed. torch.save drops the errno of a full disk, so a RuntimeError
    on a filesystem with (almost) no space left is named for what it is."""
    try:
        stats = os.statvfs(ckpt_dir)
        free = stats.f_bavail * stats.f_frsize
    except OSError:
        free = None
    where = f"{free} bytes free in {ckpt_dir}" if free is not None else str(ckpt_dir)
    if isinstance(err, OSError) and err.errno is not None:
        name = f"; {err.filename}" if err.filename else ""
        return f"{os.strerror(err.errno)} ({where}{name})"
    # torch's first line, less its "[enforce fail at inline_container.cc:672] . " prefix
    detail = (str(err).splitlines() or [type(err).__name__])[0].split("] . ")[-1]
    if free is not None and free < FULL_BELOW_BYTES:
        return f"{os.strerror(errno.ENOSPC)} ({where}; torch.save: {detail})"
    return f"{detail} ({where})"


def _close_partial_files(err: BaseException) -> None:
    """torch.save's C++ writer keeps the partial file open, referenced from the frames of the
    traceback: a removed file's blocks stay allocated while it is open, so the disk would stay full
    (and the run could not write its summary) until the garbage collector happened to free that
    cycle. Clearing the frames' locals closes it now; the tracebacks keep their lines."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


def _discard(ckpt_dir: Path, tmp_tag: str, tag: str) -> None:
    """Undo a save that failed before its commit: the partial directory and the pending files go,
    a same-step checkpoint set aside by the commit comes back."""
    shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
    for name in ("latest", "best.json"):
        (ckpt_dir / (name + PENDING_SUFFIX)).unlink(missing_ok=True)
    old, final_dir = ckpt_dir / (OLD_PREFIX + tag), ckpt_dir / tag
    if old.exists() and not final_dir.exists():
        os.replace(old, final_dir)


def _write_synced(path: Path, text: str) -> Path:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def _commit(ckpt_dir: Path, tmp_tag: str, tag: str, step: int, best: Optional[dict]) -> None:
    tmp_dir, final_dir = ckpt_dir / tmp_tag, ckpt_dir / tag
    names = [str(p.relative_to(tmp_dir)) for p in sorted(tmp_dir.rglob("*")) if p.is_file()]
    files = {name: (tmp_dir / name).stat().st_size for name in names}
    # note: without these fsyncs the rename can reach the disk before the data it names
    sha256 = {}
    for name in names:
        sha256[name] = _sha256(tmp_dir / name)  # the bytes DeepSpeed wrote, read back from the page cache
        _fsync(tmp_dir / name)
    manifest = {"tag": tag, "step": step, "files": files, "sha256": sha256}
    _write_synced(tmp_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp_dir)
    # the last writes that take space, before anything is renamed: a full disk fails here
    latest_tmp = _write_synced(ckpt_dir / ("latest" + PENDING_SUFFIX), tag)
    best_tmp = None
    if best is not None:
        best_tmp = _write_synced(ckpt_dir / ("best.json" + PENDING_SUFFIX),
                                 json.dumps({"tag": tag, "step": step, **best}) + "\n")
    old = None
    if final_dir.exists():  # the same step saved again (resumed after a crash that followed this save)
        old = ckpt_dir / (OLD_PREFIX + tag)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync(ckpt_dir)
    os.replace(latest_tmp, ckpt_dir / "latest")
    if best_tmp is not None:
        os.replace(best_tmp, ckpt_dir / "best.json")
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


def zero_partitions(tag_dir: Path) -> int:
    """How many ranks' ZeRO 1/2 optimizer partitions a checkpoint holds (one file per rank); 0 at ZeRO 0."""
    return len(list(Path(tag_dir).glob("*zero_pp_rank_*_optim_states.pt")))


def check_zero_world_size(engine, tag_dir: Path) -> None:
    """ZeRO 1/2 split the optimizer state over the ranks, and DeepSpeed cannot split it anew: another
    world size is refused here, in one line, before DeepSpeed's load raises on it (--change-batch
    included; another micro batch or accumulation at the same world size is fine)."""
    saved = zero_partitions(tag_dir)
    if engine.zero_optimization() and saved and saved != engine.dp_world_size:
        ranks = f"{saved} rank{'s' if saved > 1 else ''}"
        raise ConfigError(f"{tag_dir} holds ZeRO {engine.zero_optimization_stage()}'s optimizer state partitioned "
                          f"over {ranks}; it cannot be loaded on {engine.dp_world_size}: resume ZeRO 1/2 runs with "
                          f"the world size they were trained with")


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    check_zero_world_size(engine, Path(ckpt_dir) / tag)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return client_state
