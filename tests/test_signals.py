"""Stopping the way clusters stop a job: a signal to the whole process group (SLURM's scancel and time
limit, docker stop, Ctrl-C in a terminal), through the real launchers, and a signal during start-up.
Each must end with a checkpoint at one agreed step, status `interrupted`, and a run that continues.

Every run is started in a process group of its own (start_new_session), so that os.killpg reaches
the run and everything it started, as a cluster's signal does, and nothing of the test's."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import GROUP_VARIABLES, image_tree, read_jsonl, run_cli

BIN = Path(sys.executable).parent
TINY = ["model.name=test_efficientnet", "data.image_size=16", "wandb.mode=disabled"]
LONG = [*TINY, "train.micro_batch=16", "train.max_steps=10000", "train.log_every_steps=1",
        "train.eval_every_epochs=100", "checkpoint.every_epochs=100"]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*GROUP_VARIABLES, "WANDB_MODE", "WANDB_API_KEY")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_group(command: list, cwd: Path) -> subprocess.Popen:
    """The command as the leader of a new process group; output to cwd/out.txt."""
    with open(cwd / "out.txt", "w") as out:
        return subprocess.Popen([str(c) for c in command], cwd=cwd, env=environment(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def trainer(*args) -> list:
    return [sys.executable, "-m", "trainer", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, proc: subprocess.Popen, cwd: Path, timeout: float = 240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"ended early (rc {proc.returncode}):\n{(cwd / 'out.txt').read_text()[-3000:]}"
        assert time.time() < deadline, (cwd / "out.txt").read_text()[-3000:]
        time.sleep(0.05)


def stepped(run: Path):
    path = run / "metrics.jsonl"
    return lambda: path.exists() and any("loss" in row for row in read_jsonl(path))


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (OSError, psutil.Error):
            pass
    return members


def finish(proc: subprocess.Popen, cwd: Path, timeout: float = 120) -> int:
    """The leader's exit code, once every process of its group has ended (a launcher may exit before
    the ranks it started)."""
    try:
        code = proc.wait(timeout=timeout)
        _, alive = psutil.wait_procs(group_members(proc.pid), timeout=timeout)
        assert not alive, f"still running: {alive}\n{(cwd / 'out.txt').read_text()[-3000:]}"
        return code
    finally:
        if group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def assert_interrupted_with_checkpoint(run: Path) -> int:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 10000, summary
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{summary['steps']:08d}"
    return summary["steps"]


def logged_steps(run: Path) -> list[int]:
    return [row["step"] for row in read_jsonl(run / "metrics.jsonl") if "loss" in row]


def assert_resumes(train_command: list, run: Path, stopped: int, cwd: Path) -> None:
    """--resume continues from the agreed step (here for two more steps): every logged step once."""
    result = subprocess.run([str(c) for c in train_command] + ["--run-dir", str(run), *LONG, "--resume",
                            "--stop-at-step", str(stopped + 2)], cwd=cwd, env=environment(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert logged_steps(run) == list(range(1, stopped + 3))


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_group_signal_with_dataloader_workers_checkpoints_and_resumes(tmp_path, sig):
    """The workers get the signal too; they leave it to the training process."""
    image_tree(tmp_path / "tree", per_class=20)
    folder = ["data.source=imagefolder", "data.path=tree", "data.num_workers=2"]
    proc = start_group(trainer("train", "--recipe", "demo", "--run-dir", "run", *LONG, *folder), tmp_path)
    wait_until(stepped(tmp_path / "run"), proc, tmp_path)
    os.killpg(proc.pid, sig)
    assert finish(proc, tmp_path) == 0, (tmp_path / "out.txt").read_text()[-3000:]
    output = (tmp_path / "out.txt").read_text()
    assert "killed by signal" not in output and "Traceback" not in output
    stopped = assert_interrupted_with_checkpoint(tmp_path / "run")
    assert_resumes(trainer("train", "--recipe", "demo", *folder), tmp_path / "run", stopped, tmp_path)


def test_a_signal_during_start_up_leaves_a_run_that_reruns_and_resumes(tmp_path):
    proc = start_group(trainer("train", "--recipe", "demo", "--run-dir", "run", *LONG), tmp_path)
    # DeepSpeed's import notice: the run is starting up (its handlers are in place), nothing trained yet
    wait_until(lambda: "DeepSpeed" in (tmp_path / "out.txt").read_text(), proc, tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)
    assert finish(proc, tmp_path) == 0, (tmp_path / "out.txt").read_text()[-3000:]
    assert "Traceback" not in (tmp_path / "out.txt").read_text()
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 0 and not (run / "checkpoints").exists()
    shutil.copytree(run, tmp_path / "copy")
    for directory, resume in (("run", ["--resume"]), ("copy", [])):  # no manual cleanup, either way
        result = run_cli("train", "--recipe", "demo", "--run-dir", directory, *LONG, "--stop-at-step", "2", *resume,
                         cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert logged_steps(tmp_path / directory) == [1, 2]


def test_a_group_signal_to_a_sweep_stops_its_run_with_a_checkpoint_and_the_sweep_continues(tmp_path):
    sweep = ["sweep", "--recipe", "demo", "--seeds", "1", "--sweep-dir", "sw", *LONG]
    proc = start_group(trainer(*sweep), tmp_path)
    run = tmp_path / "sw" / "demo-seed0"
    wait_until(stepped(run), proc, tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)
    assert finish(proc, tmp_path) == 128 + signal.SIGTERM  # the sweep stopped, by a signal
    stopped = assert_interrupted_with_checkpoint(run)
    again = start_group(trainer(*sweep), tmp_path)  # the same command continues the run
    wait_until(lambda: logged_steps(run)[-1] > stopped + 1, again, tmp_path)
    os.killpg(again.pid, signal.SIGTERM)
    assert finish(again, tmp_path) == 128 + signal.SIGTERM
    steps = logged_steps(run)
    assert steps == list(range(1, len(steps) + 1)) and assert_interrupted_with_checkpoint(run) > stopped


def test_sigint_to_a_sweeps_pid_reaches_its_run(tmp_path):
    proc = start_group(trainer("sweep", "--recipe", "demo", "--seeds", "1", "--sweep-dir", "sw", *LONG), tmp_path)
    run = tmp_path / "sw" / "demo-seed0"
    wait_until(stepped(run), proc, tmp_path)
    proc.send_signal(signal.SIGINT)  # the sweep's PID only, not its group
    assert finish(proc, tmp_path) == 128 + signal.SIGINT
    assert_interrupted_with_checkpoint(run)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_group_signal_to_two_ranks_under_the_deepspeed_launcher_checkpoints_once(tmp_path, sig):
    """Each rank gets the group's signal and then launch.py's SIGTERM: one request, one agreed step."""
    launcher = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", free_port(), "--module", "trainer", "train",
                "--recipe", "demo", "engine.zero_stage=1"]
    proc = start_group([*launcher, "--run-dir", "run", *LONG], tmp_path)
    wait_until(stepped(tmp_path / "run"), proc, tmp_path)
    os.killpg(proc.pid, sig)
    finish(proc, tmp_path)  # the launcher's own code: launch.py exits 1 after forwarding a signal
    stopped = assert_interrupted_with_checkpoint(tmp_path / "run")
    tag = tmp_path / "run" / "checkpoints" / f"step{stopped:08d}"
    assert len(list(tag.glob("*optim_states.pt"))) == 2  # both ranks wrote their part of the same step
    # DeepSpeed's runner dies of Ctrl-C with a KeyboardInterrupt of its own; no rank may fail
    assert 'trainer/' not in "".join(line for line in (tmp_path / "out.txt").read_text().splitlines()
                                    if line.lstrip().startswith('File "'))
    launcher[4] = free_port()
    assert_resumes(launcher, tmp_path / "run", stopped, tmp_path)


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_launchers_pid_reaches_the_ranks(tmp_path):
    """The launcher dies without forwarding it; the ranks notice and stop as if signalled."""
    proc = start_group([BIN / "deepspeed", "--num_gpus", "2", "--master_port", free_port(), "--module", "trainer",
                        "train", "--recipe", "demo", "--run-dir", "run", *LONG], tmp_path)
    wait_until(stepped(tmp_path / "run"), proc, tmp_path)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "ranks still training after their launcher died"
    assert_interrupted_with_checkpoint(tmp_path / "run")
    assert "the deepspeed launcher" in (tmp_path / "out.txt").read_text()


@pytest.mark.slow
def test_a_group_signal_to_a_torchrun_run_checkpoints(tmp_path):
    proc = start_group([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(), "-m", "trainer",
                        "train", "--recipe", "demo", "--run-dir", "run", *LONG], tmp_path)
    wait_until(stepped(tmp_path / "run"), proc, tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)
    finish(proc, tmp_path)
    assert_interrupted_with_checkpoint(tmp_path / "run")


def test_the_launchers_copy_of_a_signal_is_the_same_request_even_during_the_stop_checkpoint(monkeypatch):
    """Under load the launcher's forwarded copy can arrive while the stop checkpoint is written (a CI run lost
    its checkpoint so: status failed, exit -2). A copy within the window goes on; a third signal, or a second
    after the window, stops at once."""
    from trainer import stop as stop_module

    request = stop_module.StopRequest()
    request._handle(signal.SIGTERM, None)
    request._handle(signal.SIGTERM, None)  # the launcher's copy: no exception, the stop goes on
    assert request.received == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
        request._handle(signal.SIGINT, None)
    late = stop_module.StopRequest()
    late._handle(signal.SIGTERM, None)
    monkeypatch.setattr(stop_module.time, "monotonic", lambda: late.first_at + stop_module.REPEAT_WINDOW_S + 1)
    with pytest.raises(KeyboardInterrupt):
        late._handle(signal.SIGTERM, None)
