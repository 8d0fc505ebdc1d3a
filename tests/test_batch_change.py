"""Resuming with another batch, on request only (--change-batch), through the CLI: refused without the
flag (the run untouched) and without a resume; with it, the schedule continues at the images seen,
the data in its epoch's order, the rows and checkpoints keep a counter that never goes back, and a
plain --resume of the changed run is accepted."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, read_jsonl, run_cli
from trainer.config import WandbConfig, load_config
from trainer.optim import LRSchedule, peak_lr
from trainer.track import Tracker, row_position

# TINY is micro batch 32: 1,438 train images, 44.94 steps per epoch; 8 steps, all in epoch 0
ARGS = ["--recipe", "demo", "--run-dir", "run", *TINY, "train.max_steps=8", "train.log_every_steps=1",
        "train.eval_every_epochs=100", "checkpoint.every_epochs=100", "wandb.mode=disabled"]
BIGGER = "train.micro_batch=64"  # after TINY's: the last override wins


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run at micro batch 32 stopped after step 5 (160 images), with its checkpoint."""
    root = tmp_path_factory.mktemp("stopped")
    first = run_cli("train", *ARGS, "--stop-at-step", "5", cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    return root / "run"


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and sum(line.startswith("error:") for line in lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[-1]


def test_another_batch_needs_change_batch_and_change_batch_needs_a_resume(stopped, tmp_path):
    shutil.copytree(stopped, tmp_path / "run")
    before = snapshot(tmp_path)
    refused = run_cli("train", *ARGS, BIGGER, "--resume", cwd=tmp_path)
    assert one_error_line(refused) == (
        "error: run directory run holds a run with a different config (train.micro_batch: 32 there, 64 here); "
        "resume with the same settings (or pass --change-batch for another batch)")
    assert snapshot(tmp_path) == before  # the run untouched

    alone = run_cli("train", *[a if a != "run" else "fresh" for a in ARGS], BIGGER, "--change-batch", cwd=tmp_path)
    assert one_error_line(alone) == ("error: --change-batch changes the batch of a run being continued: it needs "
                                     "--resume (or the override resume=auto)")
    assert not (tmp_path / "fresh").exists()


def schedule_of(run: Path):
    """The lr schedule of the run's saved plan and config, as the trainer builds it."""
    plan = json.loads((run / "plan.json").read_text())
    cfg = load_config("demo", [*TINY, f"train.micro_batch={plan['micro_batch']}", "train.max_steps=8"])
    return LRSchedule(cfg.schedule, peak_lr(cfg.optim, plan["global_batch"]), plan["schedule_epoch"],
                      plan["total_steps"]), plan


def test_change_batch_continues_at_the_images_seen_and_a_plain_resume_follows(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    old_schedule, _ = schedule_of(run)
    # 5 steps x 32 = 160 images: step round(160 / 64) = round(2.5) = 2 (a tie goes to the even step); the
    # data resumes at image 128 of epoch 0's order, the largest multiple of 64 within the 160 consumed
    changed = run_cli("train", *ARGS, BIGGER, "--resume", "--change-batch", "--stop-at-step", "5", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert ("batch changed (--change-batch): world 1 x micro batch 32 x accum 1 = global batch 32 -> world 1 x "
            "micro batch 64 x accum 1 = global batch 64 | step 5 -> 2 (160 images seen) | peak lr 0.002 -> 0.004 | "
            "epoch 0 resumes at image 128 of its order, not 160 (32 images seen twice)") in changed.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["micro_batch"] == 64
    # the batch is the run's own now: a plain --resume continues it, to the new plan's last step
    plain = run_cli("train", *ARGS, BIGGER, "--resume", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "(step 5)" in plain.stdout and "batch changed" not in plain.stdout

    rows = read_jsonl(run / "metrics.jsonl")
    event = next(r for r in rows if r.get("event") == "batch_change")
    assert {k: event[k] for k in ("step", "steps_taken", "step_before", "global_batch_before", "global_batch_after",
                                  "image_before", "image_after", "images_repeated")} == {
        "step": 2, "steps_taken": 5, "step_before": 5, "global_batch_before": 32, "global_batch_after": 64,
        "image_before": 160, "image_after": 128, "images_repeated": 32}
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]  # the schedule's step went back
    assert [r.get("steps_taken") for r in train] == [None] * 5 + [6, 7, 8, 9, 10, 11]  # only where it differs
    # W&B's step; the event goes with the first step after it
    assert [row_position(r) for r in rows] == [1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 10, 11, 11]
    # the lr: each row's step of its own plan's schedule (a row logs the lr its step used: step - 1)
    new_schedule, plan = schedule_of(run)
    assert plan["global_batch"] == 64 and plan["total_steps"] == 8
    assert [r["lr"] for r in train[:5]] == pytest.approx([old_schedule(s - 1) for s in range(1, 6)], rel=1e-12)
    assert [r["lr"] for r in train[5:]] == pytest.approx([new_schedule(s - 1) for s in range(3, 9)], rel=1e-12)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8 and summary["images_seen"] == 160 + 6 * 64
    # checkpoints are named by the steps taken: the newest is the highest tag, whatever the step
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000011"
    state = torch.load(run / "checkpoints" / "step00000011" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    assert (state["trainer"]["step"], state["trainer"]["steps_taken"]) == (8, 11)
    assert state["batch"]["micro_batch"] == 64
    # a resume from the checkpoint the change started from (its session killed) drops the change's rows
    Tracker(run, {}, WandbConfig(mode="disabled"), "run", enabled=True, resume_steps_taken=5)
    assert read_jsonl(run / "metrics.jsonl") == rows[:5]
