"""Issue 18.3: one owner per run directory. A second process on a run directory in use is refused
with one line naming the owner (exit 2, nothing written); a dead owner's lock file blocks nobody."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, run_cli
from test_reliability import QUIET, TINY, latest, snapshot, start_cli, summary, wait_for
from trainer.runlock import LOCK_NAME, RunDirBusy, acquire, check_not_held

# 44 steps an epoch, a checkpoint every 11: long enough to be caught running
ARGS = [*TINY, *QUIET, "train.micro_batch=32", "train.epochs=2", "train.log_every_steps=1",
        "train.eval_every_epochs=1", "checkpoint.every_epochs=0.25"]


def test_a_second_process_is_refused_while_the_owner_runs_and_a_dead_owner_blocks_nobody(tmp_path):
    run = tmp_path / "run"
    owner = start_cli("train", "--recipe", "demo", "--run-dir", run, *ARGS, cwd=tmp_path)
    try:
        wait_for(lambda: latest(run), owner)  # running, with a checkpoint a --resume would take
        owner.send_signal(signal.SIGSTOP)  # frozen: its files hold still while the second one tries
        before = snapshot(run)
        second = run_cli("train", "--recipe", "demo", "--run-dir", "run", *ARGS, "--resume", cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: run directory run is in use by PID {owner.pid} on host "
                                    f"{socket.gethostname()} since "), lines[-1]
        assert lines[-1].endswith("wait for that run to end, or choose another --run-dir")
        assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in second.stderr
        assert snapshot(run) == before  # the refused process wrote nothing

        owner.kill()  # a dead owner: its lock file stays, naming it
        assert owner.wait(timeout=60) == -signal.SIGKILL
    finally:
        if owner.poll() is None:
            owner.kill()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == owner.pid
    kept = int(latest(run)[4:])
    resumed = run_cli("train", "--recipe", "demo", "--run-dir", "run", *ARGS, "--resume",
                      "--stop-at-step", kept + 1, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {kept})" in resumed.stdout
    assert summary(run)["status"] == "interrupted" and summary(run)["steps"] == kept + 1
    assert json.loads((run / LOCK_NAME).read_text())["pid"] != owner.pid  # the new owner's


def test_the_lock_names_its_owner_and_is_free_once_released(tmp_path):
    lock = acquire(tmp_path)
    written = json.loads((tmp_path / LOCK_NAME).read_text())
    assert written["pid"] == os.getpid() and written["host"] == socket.gethostname()
    with pytest.raises(RunDirBusy, match=f"in use by PID {os.getpid()} on host {socket.gethostname()}"):
        check_not_held(tmp_path)  # flock: another open of the file conflicts, even in this process
    with pytest.raises(RunDirBusy):
        acquire(tmp_path)
    lock.release()
    lock.release()  # idempotent: the loop may reach it twice
    check_not_held(tmp_path)
    acquire(tmp_path).release()
    check_not_held(tmp_path / "absent")  # never locked: nothing to check, nothing created
    assert not (tmp_path / "absent").exists()


def test_an_owner_killed_with_live_forked_children_leaves_the_lock_free(tmp_path):
    """A DataLoader worker is a fork of the owner: it must not keep the lock after the owner dies."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from trainer.runlock import acquire
        lock = acquire({str(tmp_path)!r})
        child = os.fork()
        if child == 0:  # the worker outlives its parent for a while (off the test's pipes)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        os.kill(os.getpid(), 9)
    """)
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=child_env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout)
    try:
        os.kill(child, 0)  # the orphaned child still runs...
        check_not_held(tmp_path)  # ...and holds nothing
        acquire(tmp_path).release()
    finally:
        os.kill(child, signal.SIGKILL)
