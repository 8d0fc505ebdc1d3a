"""A real training run through the CLI: DeepSpeed engine, embedded data, W&B offline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import GROUP_VARIABLES, TINY, read_jsonl

SHORT = [*TINY, "train.max_steps=6", "train.log_every_steps=2", "train.eval_every_epochs=0.1",
         "checkpoint.every_epochs=0.1", "wandb.mode=offline"]


def wandb_records(run_dir: Path) -> list[dict]:
    """The offline W&B run, read back with wandb's own reader."""
    reader = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(reader), "leet", "inspect", "--json", str(run_dir / "wandb" / "latest-run")],
                         capture_output=True, text=True, check=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_short_run_writes_every_file(cli, tmp_path):
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["recipe"] == "demo" and config["model"]["name"] == "test_efficientnet"
    assert config["train"]["max_steps"] == 6

    rows = read_jsonl(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "top1" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for row in train_rows:
        assert {"step", "epoch", "loss", "lr", "images_per_s"} <= row.keys()
        assert row["images_per_s"] > 0
        # the step moved the weights by a small fraction of their norm (SGD at this lr: ~1e-4 to 1e-2)
        assert row["weight_norm"] > 0 and 1e-6 < row["update_ratio"] < 0.1
    assert [r["step"] for r in eval_rows] == [4, 6]
    for row in eval_rows:
        assert 0 <= row["top1"] <= row["top5"] <= 100 and 0 <= row["ema_top1"] <= row["ema_top5"] <= 100
        assert row["val_images"] == 359  # 20% of the 1,797 digits, each counted once

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    for key in ("top1", "top5", "ema_top1", "ema_top5"):
        assert summary[key] == eval_rows[-1][key]
        assert summary[f"best_{key}"] == max(r[key] for r in eval_rows)
    assert summary["images_per_s"] > 0 and summary["wall_time_s"] > 0 and summary["epochs"] > 0

    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000006"

    records = wandb_records(run)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx([r["loss"] for r in train_rows])
    assert [h["ema_top1"] for h in history if "ema_top1" in h] == pytest.approx([r["ema_top1"] for r in eval_rows])
    run_record = next(r["run"] for r in records if r["type"] == "run")
    assert run_record["config"]["update"]["train"]["max_steps"] == 6


def test_stop_and_resume_continue_the_same_run(cli, tmp_path):
    first = cli("train", "--recipe", "demo", "--run-dir", "run", *SHORT, "--stop-at-step", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"

    second = cli("train", "--recipe", "demo", "--run-dir", "run", *SHORT, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps == [2, 4, 6]  # continuous: no step logged twice, none missing


@pytest.mark.parametrize("args, message", [
    (["--recipe", "demo", "train.epochz=1"], "unknown config key 'train.epochz'"),
    (["--recipe", "demo", "train.epochs=soon"], "config key 'train.epochs'"),
    (["--recipe", "demo", "optim.lr=0"], "config key 'optim.lr'"),
    (["--recipe", "nosuch"], "unknown recipe 'nosuch'"),
])
def test_config_errors_exit_2_before_writing(cli, tmp_path, args, message):
    result = cli("train", "--run-dir", "run", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_run_dir_holding_another_run_is_refused(cli, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("recipe: other\n")
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *SHORT)
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (tmp_path / "run" / "config.yaml").read_text() == "recipe: other\n"


def test_help_explains_verbs_recipes_and_overrides(cli):
    top = cli("--help")
    assert top.returncode == 0 and "train" in top.stdout and "recipes" in top.stdout
    train = cli("train", "--help")
    assert train.returncode == 0
    for text in ("--recipe", "--run-dir", "--resume", "key=value", "demo", "deepspeed"):
        assert text in train.stdout



def test_same_module_runs_under_the_deepspeed_launcher(tmp_path):
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {k: v for k, v in os.environ.items() if k not in GROUP_VARIABLES}
    result = subprocess.run([str(launcher), "--num_gpus", "1", "--master_port", "29731", "--module", "trainer",
                             "train", "--recipe", "demo", "--run-dir", "run", *SHORT],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
