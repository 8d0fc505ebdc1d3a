"""Issue 8, through the CLI: interruption (SIGTERM/SIGINT, kill -9), exact resume, checkpoints
written atomically (a crash mid-write), bad input (one line, exit 2, nothing damaged), and W&B
falling back to offline when its server cannot be reached."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import GROUP_VARIABLES, read_jsonl, run_cli

TINY = ["model.name=test_efficientnet", "data.image_size=16"]
QUIET = ["wandb.mode=disabled"]


def start_cli(*args, cwd: Path) -> subprocess.Popen:
    """The CLI in the background (for signals); its output goes to cwd/stdout.txt and stderr.txt."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("WANDB_MODE", "WANDB_API_KEY", *GROUP_VARIABLES):
        env.pop(name, None)
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, env=env,
                                stdout=out, stderr=err)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the condition held"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting")


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [row["step"] for row in read_jsonl(path) if "loss" in row]


def latest(run: Path) -> str | None:
    path = run / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else None


def final_state(run: Path) -> dict:
    """The weights, EMA and optimizer state of the run's latest checkpoint."""
    tag = latest(run)
    return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# -- 1. SIGTERM / SIGINT: checkpoint at the next step boundary, status interrupted, exit 0; kill -9

LONG = [*TINY, *QUIET, "train.micro_batch=32", "train.epochs=2", "train.log_every_steps=1",
        "train.eval_every_epochs=1", "checkpoint.every_epochs=1"]  # 44.94 steps/epoch as TF counts, 89 steps


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_at_the_next_step_and_resume_finishes(tmp_path, sig):
    run = tmp_path / "run"
    proc = start_cli("train", "--recipe", "demo", "--run-dir", run, *LONG, cwd=tmp_path)
    seen = wait_for(lambda: logged_steps(run), proc)[-1]
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]

    done = summary(run)
    assert done["status"] == "interrupted"
    stopped = done["steps"]
    assert seen <= stopped < 89  # the step boundary after the signal, not the end of the run
    assert latest(run) == f"step{stopped:08d}"
    assert f"{sig.name}: checkpoint written at step {stopped}" in (tmp_path / "stdout.txt").read_text()

    again = run_cli("train", "--recipe", "demo", "--run-dir", run, *LONG, "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {stopped})" in again.stdout
    assert summary(run)["status"] == "completed" and summary(run)["steps"] == 89
    assert logged_steps(run) == list(range(1, 90))  # every step once: none lost, none twice


def test_kill_9_loses_only_the_work_since_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, *QUIET, "train.micro_batch=32", "train.epochs=1", "train.log_every_steps=1",
            "train.eval_every_epochs=0.5", "checkpoint.every_epochs=0.25"]  # 44 steps, checkpoint every 11
    proc = start_cli("train", "--recipe", "demo", "--run-dir", run, *args, cwd=tmp_path)
    # killed with steps logged past its last checkpoint: those are the work it may lose
    wait_for(lambda: latest(run) and logged_steps(run) and logged_steps(run)[-1] > int(latest(run)[4:]) + 2, proc)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    kept = int(latest(run)[4:])
    assert logged_steps(run)[-1] > kept

    again = run_cli("train", "--recipe", "demo", "--run-dir", run, *args, "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {kept})" in again.stdout
    assert summary(run)["status"] == "completed" and summary(run)["steps"] == 44
    rows = read_jsonl(run / "metrics.jsonl")
    assert logged_steps(run) == list(range(1, 45))  # the killed run's rows after step `kept` were replaced
    assert [r["step"] for r in rows if "top1" in r] == [22, 44]


# -- 2. Exact resume: interrupted mid-epoch or at an epoch boundary, then resumed, equals uninterrupted

# dropout, drop path, random erasing, mixup/cutmix and flips all on: every random number must be redrawn
EXACT = [*TINY, *QUIET, "train.micro_batch=128", "train.epochs=2", "train.log_every_steps=2",
         "train.eval_every_epochs=0.25", "checkpoint.every_epochs=0.5", "checkpoint.keep=1",
         "checkpoint.keep_best=ema_top1", "model.drop_rate=0.2", "model.drop_path_rate=0.2",
         "data.hflip=0.5", "data.random_erasing=0.5", "mixup.mode=batch", "mixup.alpha=0.2",
         "mixup.cutmix_alpha=1.0"]  # 1,438 train images / 128 = 11 steps per epoch, 22 steps
TIMING = {"images_per_s"}


def test_resume_is_exact_mid_epoch_and_at_an_epoch_boundary(cli, tmp_path):
    full = cli("train", "--recipe", "demo", "--run-dir", "full", *EXACT)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "11.23 steps/epoch (11 per pass of the loader)" in full.stdout and ", 22 steps |" in full.stdout
    reference_rows = [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    reference = final_state(tmp_path / "full")

    for stop in (5, 11):  # 5: mid-epoch and mid logging window; 11: the last step of epoch 0
        run = tmp_path / f"stop{stop}"
        first = cli("train", "--recipe", "demo", "--run-dir", run, *EXACT, "--stop-at-step", stop)
        assert first.returncode == 0, first.stderr[-3000:]
        assert summary(run)["status"] == "interrupted" and latest(run) == f"step{stop:08d}"
        second = cli("train", "--recipe", "demo", "--run-dir", run, *EXACT, "--resume")
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"(step {stop})" in second.stdout

        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run / "metrics.jsonl")]
        assert rows == reference_rows, f"metrics differ after resuming at step {stop}"
        state = final_state(run)
        for part in ("module", "ema"):
            assert state[part].keys() == reference[part].keys()
            unequal = [k for k in reference[part] if not torch.equal(state[part][k], reference[part][k])]
            assert not unequal, f"{part} differs after resuming at step {stop}: {unequal[:5]}"
        moments = [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
        expected = [v for s in reference["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
        assert len(moments) == len(expected) and all(map(torch.equal, moments, expected))
        assert state["trainer"] == {**reference["trainer"], "train_seconds": state["trainer"]["train_seconds"]}
        for key in ("status", "steps", "final", "best"):
            assert summary(run)[key] == summary(tmp_path / "full")[key]

    # kept: the last checkpoint (keep_checkpoints=1) and the best by EMA top-1
    ckpts = tmp_path / "full" / "checkpoints"
    evals = [r for r in reference_rows if "ema_top1" in r]
    best = json.loads((ckpts / "best.json").read_text())
    top = max(r["ema_top1"] for r in evals)
    assert best["metric"] == "ema_top1" and best["value"] == top
    assert best["step"] == next(r["step"] for r in evals if r["ema_top1"] == top)
    assert sorted(p.name for p in ckpts.glob("step*")) == sorted({best["tag"], "step00000022"})


# -- 3. Atomic checkpoints: a crash while writing one leaves the previous one, and resume uses it

CRASH_ON_SECOND_SAVE = """
import os, signal, sys
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
original, saves = TorchCheckpointEngine.save, []
def save(self, state_dict, path):
    saves.append(path)
    original(self, state_dict, path)
    if len(saves) == 2:  # half the file is on disk when the process dies
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
TorchCheckpointEngine.save = save
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    args = ["train", "--recipe", "demo", "--run-dir", "run", *TINY, *QUIET, "train.micro_batch=32",
            "train.max_steps=12", "train.log_every_steps=1", "train.eval_every_epochs=0.1",
            "checkpoint.every_epochs=0.1", "checkpoint.keep=1"]  # a checkpoint every 4 steps
    env = {k: v for k, v in os.environ.items() if k not in GROUP_VARIABLES}
    crashed = subprocess.run([sys.executable, "-c", CRASH_ON_SECOND_SAVE, *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / ".tmp-step00000008").is_dir()  # the save that died: never renamed into place
    assert latest(tmp_path / "run") == "step00000004"

    # worse than our writer can leave: a tag directory in place whose file lost its tail, named by `latest`
    bogus = ckpts / "step00000009"
    bogus.mkdir()
    (bogus / "manifest.json").write_text((ckpts / "step00000004" / "manifest.json").read_text())
    data = (ckpts / "step00000004" / "mp_rank_00_model_states.pt").read_bytes()
    (bogus / "mp_rank_00_model_states.pt").write_bytes(data[: len(data) // 3])
    (ckpts / "latest").write_text("step00000009")

    resumed = run_cli(*args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {Path('run') / 'checkpoints' / 'step00000004'} (step 4)" in resumed.stdout
    assert summary(tmp_path / "run")["status"] == "completed" and summary(tmp_path / "run")["steps"] == 12
    assert logged_steps(tmp_path / "run") == list(range(1, 13))
    leftovers = {p.name for p in ckpts.iterdir()} - {"latest", "best.json"}
    best = json.loads((ckpts / "best.json").read_text())["tag"]
    assert leftovers == {"step00000012", best}  # the partial and the damaged directories are gone
    assert final_state(tmp_path / "run")["trainer"]["step"] == 12


# -- 4. Bad input: one line naming the problem, exit code 2, nothing already written changed

def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A finished run (run/) and the bad inputs pointed at it."""
    root = tmp_path_factory.mktemp("bad_input")
    done = run_cli("train", "--recipe", "demo", "--run-dir", "run", *TINY, *QUIET, "train.micro_batch=32",
                   "train.max_steps=2", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "empty").mkdir()
    (root / "no_classes").mkdir()
    (root / "no_classes" / "notes.txt").write_text("a file, no class folders\n")
    (root / "no_images" / "cat").mkdir(parents=True)
    (root / "no_images" / "cat" / "notes.txt").write_text("not an image\n")
    (root / "broken.json").write_text('{"zero_optimization": {"stage": 0},\n')
    (root / "contradicts.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 7}))
    return root


RESUME = ["--run-dir", "run", "--resume", *TINY, *QUIET, "train.micro_batch=32", "train.max_steps=2"]
BAD_INPUT = {
    "unknown key": (["--run-dir", "run", "--resume", "train.epochz=3"], "unknown config key 'train.epochz'"),
    "mistyped value": ([*RESUME, "train.epochs=soon"], "config key 'train.epochs'"),
    "value out of range": ([*RESUME, "checkpoint.keep=0"], "config key 'checkpoint.keep'"),
    "unknown choice": ([*RESUME, "checkpoint.keep_best=top7"], "config key 'checkpoint.keep_best'"),
    "data folder missing": ([*RESUME, "data.source=imagefolder", "data.path=nowhere"],
                            "data folder nowhere does not exist"),
    "data folder empty": ([*RESUME, "data.source=imagefolder", "data.path=empty"], "class folder"),
    "no class folders": ([*RESUME, "data.source=imagefolder", "data.path=no_classes"], "class folder"),
    "class folder without images": ([*RESUME, "data.source=imagefolder", "data.path=no_images"],
                                    "no valid file for the classes cat"),
    "fp16 on the CPU": ([*RESUME, "engine.precision=fp16"], "engine.allow_cpu_fp16=true"),
    "DeepSpeed config does not parse": ([*RESUME, "engine.ds_config=broken.json"], "broken.json: not valid JSON"),
    "DeepSpeed config contradicts the batch": ([*RESUME, "engine.ds_config=contradicts.json"],
                                               "train_micro_batch_size_per_gpu=7 contradicts the trainer's "
                                               "train.micro_batch=32"),
    "--resume without a run": (["--run-dir", "nothing_here", "--resume", *TINY, *QUIET],
                               "nothing_here holds no run to resume"),
    "--resume without --run-dir": (["--resume", *TINY, *QUIET], "resuming needs --run-dir"),
    "run dir holds another run": (["--run-dir", "run", *TINY, *QUIET, "train.micro_batch=32",
                                   "train.max_steps=2"], "run directory run already holds a run"),
    "resume with another config": ([*RESUME, "optim.lr=0.5"],
                                   "holds a run with a different config (optim.lr: 0.016 there, 0.5 here)"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(workdir, case):
    args, message = BAD_INPUT[case]
    before = snapshot(workdir)
    result = run_cli("train", "--recipe", "demo", *args, cwd=workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    # torch/DeepSpeed may print warnings while importing: the error is the last line and the only one
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in result.stderr
    assert snapshot(workdir) == before  # no run directory created, nothing in run/ rewritten


def test_resuming_a_run_made_before_a_setting_existed_names_the_setting(workdir, tmp_path):
    shutil.copytree(workdir / "run", tmp_path / "run")
    config = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    del saved["data"]["jpeg_dct"]  # as an older trainer wrote it
    config.write_text(yaml.safe_dump(saved))
    result = run_cli("train", "--recipe", "demo", *RESUME, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: run directory run holds a run with a different config (data.jpeg_dct: absent there (an older "
        "trainer made the run), 'fast' here); resume with the same settings")


def test_wandb_unreachable_falls_back_to_offline(cli, tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567",
           "WANDB_BASE_URL": "http://127.0.0.1:9"}  # port 9 (discard): connection refused
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *TINY, "train.micro_batch=32",
                 "train.max_steps=2", "train.log_every_steps=1", "wandb.init_timeout_s=3", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: W&B online failed")]
    assert len(warnings) == 1 and warnings[0].endswith("logging offline instead")
    assert summary(tmp_path / "run")["status"] == "completed"
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    run_id = (tmp_path / "run" / "wandb_id.txt").read_text().strip()
    assert offline[0].name == f"run-{run_id}.wandb"  # the run's own id: `wandb sync` uploads it later
