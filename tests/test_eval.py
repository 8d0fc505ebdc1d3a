"""Numbers that can be set beside TF's: a separate validation set (data.val_path), the `eval` verb on a
run's checkpoint or a plain weights file, and the weights a run leaves as timm state dicts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import GROUP_VARIABLES, image_tree

FOLDER = ["model.name=test_efficientnet", "data.image_size=16", "train.micro_batch=8", "data.source=imagefolder",
          "data.path=train", "wandb.mode=disabled", "train.eval_every_epochs=100"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def trees(tmp_path):
    image_tree(tmp_path / "train", per_class=12)  # 36 images, classes cat dog fox
    image_tree(tmp_path / "val", per_class=5)  # 15 images, the same classes
    return tmp_path


@pytest.fixture
def trained(trees, cli):
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *FOLDER, "data.val_path=val", "train.max_steps=4",
                 env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return trees / "run", result


def test_a_separate_validation_set_trains_on_all_of_the_training_tree(trained):
    run, result = trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["validation"] == "data.val_path val (15 images)" and summary["final"]["val_images"] == 15
    assert json.loads((run / "plan.json").read_text())["train_images"] == 36  # nothing carved out
    assert "validation: data.val_path val (15 images)" in result.stdout


def test_without_a_validation_set_the_run_says_its_numbers_are_of_training_images(trees, cli):
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *FOLDER, "train.max_steps=1", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((trees / "run" / "summary.json").read_text())
    assert "held out of the training data" in summary["validation"]
    assert "not a separate validation set" in summary["validation"] and "not a separate" in result.stdout


def test_a_validation_set_with_other_classes_is_refused_before_writing(trees, cli):
    (trees / "val" / "fox").rename(trees / "val" / "wolf")
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *FOLDER, "data.val_path=val")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert "classes differ from data.path's at class 2: 'wolf' there, 'fox' in the training data" in lines[0]
    assert not (trees / "run").exists()


def test_a_completed_run_leaves_weights_timm_loads_without_the_trainer(trained):
    run, _ = trained
    for name in ("model", "ema", "best_model", "best_ema"):
        model = timm.create_model("test_efficientnet", num_classes=3)
        model.load_state_dict(load_file(run / f"{name}.safetensors"))  # strict: every key, every shape
    versions = json.loads((run / "versions.json").read_text())
    assert len(versions["git_commit"]) == 40 and isinstance(versions["git_dirty"], bool)
    assert versions["torch"] == torch.__version__.split("+")[0] and versions["timm"] == timm.__version__


def test_eval_of_the_last_checkpoint_repeats_the_runs_last_evaluation(trained, cli):
    run, _ = trained
    result = cli("eval", "--run-dir", "run", "--checkpoint", "latest", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((run / "eval-step00000004.json").read_text())
    final = json.loads((run / "summary.json").read_text())["final"]
    assert out["images"] == 15
    assert out["model"]["top1"] == pytest.approx(final["top1"]) and out["ema"]["top1"] == pytest.approx(final["ema_top1"])
    assert out["ema"]["loss"] == pytest.approx(final["ema_val_loss"], rel=1e-5)
    weights = cli("eval", "--weights", "run/ema.safetensors", "--recipe", "demo", *FOLDER, "data.val_path=val",
                  "--out", "ema.json", env=ONE_THREAD)
    assert weights.returncode == 0, weights.stderr[-3000:]
    assert json.loads((run.parent / "ema.json").read_text())["weights"] == pytest.approx(out["ema"])


@pytest.mark.parametrize("args, message", [
    (["--run-dir", "nowhere"], "--run-dir nowhere: no run there"),
    (["--run-dir", "run", "--checkpoint", "step00000099"], "--checkpoint step00000099: no such complete checkpoint"),
    (["--run-dir", "run", "model.name=efficientnet_b0"], "do not fit efficientnet_b0"),
    (["--weights", "run/ema.safetensors", "--recipe", "demo", "model.name=test_efficientnet", "data.image_size=16"],
     "do not fit test_efficientnet with 10 classes: classifier.bias is [3] there, [10] here"),
    (["--weights", "missing.pth", "--recipe", "demo"], "--weights missing.pth: no such file"),
])
def test_eval_refuses_bad_input_in_one_line(trained, cli, args, message):
    result = cli("eval", *args, env=ONE_THREAD)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and message in lines[-1] and lines[-1].startswith("error:"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_under_the_deepspeed_launcher_counts_every_image_once(trained):
    run, _ = trained
    env = {k: v for k, v in os.environ.items() if k not in GROUP_VARIABLES}
    launcher = Path(sys.executable).parent / "deepspeed"
    result = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", "29741", "--module", "trainer",
                             "eval", "--run-dir", "run", "--out", "two.json"], cwd=run.parent,
                            env={**env, **ONE_THREAD}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    two = json.loads((run.parent / "two.json").read_text())
    final = json.loads((run / "summary.json").read_text())["final"]
    assert two["images"] == 15  # 8 + 7 over two ranks, none twice
    assert two["model"]["top1"] == pytest.approx(final["top1"]) and two["ema"]["top1"] == pytest.approx(final["ema_top1"])
