"""Issue 18.4: checkpoints carry a sha256 per file, checked before a load (a damaged latest one is
skipped for the newest intact one, and said so), and a full disk while checkpointing fails the run
with one line, keeping the previous checkpoint and `latest` as they were. Real runs, real files,
a real full filesystem (a small tmpfs)."""
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import read_jsonl, run_cli
from test_reliability import QUIET, TINY, latest, logged_steps, snapshot, summary
from trainer.checkpoint import verify
from trainer.runlock import LOCK_NAME

# 44 steps an epoch: a checkpoint (and an evaluation) every 4 steps, 12 steps in all
ARGS = [*TINY, *QUIET, "train.micro_batch=32", "train.max_steps=12", "train.log_every_steps=1",
        "train.eval_every_epochs=0.1", "checkpoint.every_epochs=0.1", "checkpoint.keep=2"]
MODEL = "mp_rank_00_model_states.pt"


def train(run: Path, *extra, cwd: Path):
    return run_cli("train", "--recipe", "demo", "--run-dir", run.relative_to(cwd), *ARGS, *extra, cwd=cwd)


def flip_bytes(path: Path) -> None:
    """Same size, other content: what a bad block or a botched copy leaves, invisible to a size check."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def stopped_at_8(tmp_path_factory):
    """A run interrupted at step 8, with its checkpoints at steps 4 and 8."""
    root = tmp_path_factory.mktemp("stopped")
    first = train(root / "run", "--stop-at-step", 8, cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    return root / "run"


def test_the_manifest_holds_each_files_sha256(stopped_at_8):
    for tag in ("step00000004", "step00000008"):
        manifest = json.loads((stopped_at_8 / "checkpoints" / tag / "manifest.json").read_text())
        assert manifest["files"].keys() == manifest["sha256"].keys() == {MODEL}
        data = (stopped_at_8 / "checkpoints" / tag / MODEL).read_bytes()
        assert manifest["files"][MODEL] == len(data)
        assert manifest["sha256"][MODEL] == hashlib.sha256(data).hexdigest()


def test_a_damaged_latest_checkpoint_is_skipped_for_the_previous_one(stopped_at_8, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_at_8, run)
    flip_bytes(run / "checkpoints" / "step00000008" / MODEL)
    assert latest(run) == "step00000008"

    resumed = train(run, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {Path('run') / 'checkpoints' / 'step00000004'} (step 4)" in resumed.stdout
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert warnings == [f"warning: checkpoint step00000008: {MODEL} kept its size but not its content (sha256 "
                        f"differs from manifest.json); resuming from step00000004, the newest intact one"]
    assert summary(run)["status"] == "completed" and summary(run)["steps"] == 12
    assert logged_steps(run) == list(range(1, 13))  # steps 5-8 redone once, not twice
    assert verify(run / "checkpoints" / "step00000008") is None  # written again by the resumed run


def test_a_checkpoint_without_checksums_still_resumes(stopped_at_8, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_at_8, run)
    for manifest in (run / "checkpoints").glob("step*/manifest.json"):  # as the trainer wrote them before
        old_style = json.loads(manifest.read_text())
        del old_style["sha256"]
        manifest.write_text(json.dumps(old_style, indent=1) + "\n")

    resumed = train(run, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 8)" in resumed.stdout and "warning: checkpoint" not in resumed.stderr
    assert summary(run)["status"] == "completed" and logged_steps(run) == list(range(1, 13))


def test_every_checkpoint_damaged_is_one_line_exit_2_and_nothing_written(stopped_at_8, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_at_8, run)
    for tag in ("step00000004", "step00000008"):
        flip_bytes(run / "checkpoints" / tag / MODEL)
    before = snapshot(run)
    resumed = train(run, "--resume", cwd=tmp_path)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    last = resumed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: every checkpoint in {Path('run') / 'checkpoints'} is damaged (step00000008: ")
    assert last.endswith("nothing intact to resume from") and "Traceback" not in resumed.stderr
    # metrics and checkpoints as they were: not started over. run.lock names the last owner: this process
    # took the directory before it could read the checkpoints
    unchanged = lambda files: {name: state for name, state in files.items() if name != LOCK_NAME}  # noqa: E731
    assert unchanged(snapshot(run)) == unchanged(before)


# -- a full disk while checkpointing

@pytest.fixture
def small_filesystem(tmp_path):
    """A tmpfs we can shrink under a run (mounting needs root: skipped without it)."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() if mounted else 'not root'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def resize(mount_point: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_fails_the_run_in_one_line_and_keeps_the_previous_one(small_filesystem):
    fs = small_filesystem
    run = fs / "run"
    first = train(run, "--stop-at-step", 4, cwd=fs)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = run / "checkpoints"
    stats = os.statvfs(fs)
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    resize(fs, used + (ckpts / "step00000004" / MODEL).stat().st_size // 2)  # room for half a checkpoint

    full = train(run, "--resume", cwd=fs)
    assert full.returncode == 1, full.stderr[-3000:]
    # tqdm's bars share stderr: the error is the end of its line
    errors = [line[line.index("error:"):] for line in full.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert errors[0].startswith("error: checkpoint step00000008 not written: No space left on device ("), errors[0]
    assert summary(run)["status"] == "failed" and summary(run)["steps"] == 8  # the summary still written
    assert {p.name for p in ckpts.iterdir()} <= {"step00000004", "latest", "best.json"}  # no .tmp-*, no latest.tmp
    assert latest(run) == "step00000004" and verify(ckpts / "step00000004") is None
    assert json.loads((ckpts / "best.json").read_text())["tag"] == "step00000004"

    resize(fs, 64 << 20)  # space again: the run goes on from the checkpoint it kept
    again = train(run, "--resume", cwd=fs)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(step 4)" in again.stdout
    assert summary(run)["status"] == "completed" and summary(run)["steps"] == 12
    assert logged_steps(run) == list(range(1, 13))
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "top1" in r] == [4, 8, 12]
