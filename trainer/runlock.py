"""One owner per run directory: an exclusive flock on RUN_DIR/run.lock, held for the whole run.

Two processes writing one run directory (two `--resume` of the same run, a sweep started twice)
interleave metrics rows, prune each other's checkpoints and rename over each other's `latest`.
The lock makes the second one stop before it writes anything.

Why flock on a file that stays: the kernel drops the lock when its holder dies, however it dies
(kill -9, a lost node's process gone), so a lock file left by a dead owner never blocks anyone; no
PID is checked for liveness (a PID means nothing on another host sharing the filesystem). The file
is never deleted: unlinking it while another process waits on the old inode would let two
processes each hold "the" lock on two different files.

The file holds the owner's PID, host and start time (JSON), written only once the lock is held;
a refused process only reads it, to name the owner in its one-line error.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Optional

from .config import ConfigError

LOCK_NAME = "run.lock"
PROBE_RETRIES = 5

# locks held by this process. A forked child (a DataLoader worker) inherits the descriptor, and the
# flock lives until the last copy closes: an owner killed with -9 would stay the owner until its
# workers noticed. The child closes its copies (close only: an unlock would drop the parent's lock).
_held: "weakref.WeakSet[RunLock]" = weakref.WeakSet()


def _close_inherited_copies() -> None:
    for lock in list(_held):
        if lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None


os.register_at_fork(after_in_child=_close_inherited_copies)


class RunDirBusy(ConfigError):
    """Another live process holds the run directory."""


class RunLock:
    """The held lock; `release()` (idempotent) gives it up. A RunLock() holds nothing: the
    ranks other than 0, which never take it, get one so every rank can call `release()`."""

    def __init__(self, path: Optional[Path] = None, fd: Optional[int] = None):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            # unlock first: a forked DataLoader worker still alive shares the lock through its copy of fd
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):  # a lock dropped without release() (an exception in the caller) is freed with it
        try:
            self.release()
        except Exception:  # at interpreter exit: the kernel releases it anyway
            pass


def _owner_text(path: Path) -> str:
    """'PID 123 on host gpu07 since 2025-01-31 12:00:00', from the lock file, as well as it can."""
    try:
        owner = json.loads(path.read_text())
        return f"PID {owner['pid']} on host {owner['host']} since {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # the owner is writing it this very moment
        return "another process (its PID and host are not written yet)"


def _busy(run_dir: Path, path: Path) -> RunDirBusy:
    return RunDirBusy(f"run directory {run_dir} is in use by {_owner_text(path)}; "
                      f"wait for that run to end, or choose another --run-dir")


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def check_not_held(run_dir: Path) -> None:
    """Raise RunDirBusy if a live process holds run_dir. Reads only: writes nothing, creates nothing."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return  # never locked (or not a directory: the caller's own checks say so)
    except OSError as err:  # another user's run, most likely
        raise ConfigError(f"run directory {run_dir}: cannot read {LOCK_NAME} ({err.strerror})") from None
    try:
        # a shared lock on a read-only descriptor: it conflicts only with an owner's exclusive lock
        if not _try_flock(fd, fcntl.LOCK_SH):
            raise _busy(Path(run_dir), path)
    finally:
        os.close(fd)  # drops our shared lock, if we got it


def acquire(run_dir: Path) -> RunLock:
    """Take run_dir (it must exist) for this process, or raise RunDirBusy naming the owner."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise ConfigError(f"run directory {run_dir}: cannot open {LOCK_NAME} ({err.strerror})") from None
    try:
        # a few tries: another process's check_not_held holds a shared lock for a moment
        for _ in range(PROBE_RETRIES):
            if _try_flock(fd, fcntl.LOCK_EX):
                break
            time.sleep(0.02)
        else:
            raise _busy(run_dir, path)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    lock = RunLock(path, fd)
    _held.add(lock)
    return lock
