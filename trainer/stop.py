"""Stopping on a signal: SIGTERM or SIGINT asks every rank to checkpoint and stop at the same step
boundary; the handlers are the run's only while it runs (start-up included).

Clusters stop a job by signalling every process of it (SLURM's scancel and time limit, docker stop,
Ctrl-C in a terminal), and launchers forward what they receive, so one request often arrives twice in
a moment: the group's signal, then the launcher's copy (DeepSpeed's launch.py sends SIGTERM to each
rank it started, torchrun likewise). A second signal within REPEAT_WINDOW_S of the first counts as the
same request, even while the stop checkpoint is being written (on a loaded machine the launcher's copy
can arrive then: stopping at once would lose the run the signal asked to save). A later second one,
or a third, stops the process at once.

DeepSpeed's `deepspeed` command forwards nothing when it is itself signalled (on one node it just
dies, and its launch.py and the ranks train on as orphans): a rank whose launch.py has lost the
`deepspeed` process above it takes that as a stop request too."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Optional

import psutil

from .distributed import any_rank

REPEAT_WINDOW_S = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Each rank receives its signal at its own moment, so the loop acts only on `agreed`, which
    `agree` sets on every rank at the same step: a rank that stopped alone would checkpoint by
    itself while the others waited in their next collective until the timeout."""

    def __init__(self, group=None, at_step: Optional[int] = None):
        self.group = group  # a gloo group: the agreement is a host-side all_reduce, no device sync
        self.launcher = LauncherWatch()
        self.at_step = at_step  # --stop-at-step: behave as if a signal came right after this step
        self.agreed: Optional[str] = None  # why every rank stops at this step boundary
        self.received: Optional[str] = None  # this rank's own signal, not yet agreed
        self.deliveries = 0
        self.first_at = 0.0

    def _handle(self, signum, frame):
        self.deliveries += 1
        name = signal.Signals(signum).name
        if self.deliveries == 1:
            self.received, self.first_at = name, time.monotonic()
            return
        if self.deliveries == 2 and time.monotonic() - self.first_at < REPEAT_WINDOW_S:
            return  # the same request, forwarded: the stop (and its checkpoint) goes on
        raise KeyboardInterrupt(f"{name} while stopping: stopped at once")

    @contextlib.contextmanager
    def handling_signals(self):
        """Install the handlers for the block, then put back whatever was there before (a process
        that runs several trainings, such as `bench train`, gets its own handlers back)."""
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def agree(self, step: int) -> None:
        """Every rank calls this at every step boundary: a signal on any rank stops them all."""
        if self.agreed is not None:
            return
        if self.received is None and self.launcher.gone():
            self.received = f"the deepspeed launcher (PID {self.launcher.runner_pid}) exited"
        if step == self.at_step:  # the same step on every rank: no collective needed
            self.agreed = f"--stop-at-step {step}"
        elif any_rank(self.received is not None, self.group):
            self.agreed = self.received or "a signal to another rank"


class LauncherWatch:
    """Whether this rank's DeepSpeed launch.py still has the `deepspeed` process that started it."""

    def __init__(self):
        self.launch_pid = self.runner_pid = None
        try:
            parent = psutil.Process(os.getppid())
            if "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
                self.launch_pid, self.runner_pid = parent.pid, parent.ppid()
        except psutil.Error:
            pass

    def gone(self) -> bool:
        """A few microseconds: called at every step boundary."""
        if self.launch_pid is None:
            return False
        try:
            return psutil.Process(self.launch_pid).ppid() != self.runner_pid  # re-parented: its parent died
        except psutil.NoSuchProcess:
            return True
