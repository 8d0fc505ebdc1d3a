"""The notes' two fp16 failures, reproduced as named variants of `demo` on the embedded data,
stop early with status `collapsed` and a diagnosis naming where it went non-finite."""
import json

import pytest
import torch

from conftest import read_jsonl


def run_variant(cli, tmp_path, variant):
    result = cli("train", "--recipe", "demo", "--variant", variant, "--run-dir", "run",
                 "wandb.mode=disabled", "train.log_every_steps=1", timeout=600)
    return result, tmp_path / "run"


def assert_collapsed_with_diagnosis(result, run):
    assert result.returncode == 1, result.stderr[-2000:]
    assert "collapsed at step" in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "collapsed"
    diagnosis = json.loads((run / "diagnosis.json").read_text())
    assert "# Run collapsed" in (run / "diagnosis.md").read_text()
    scales = [row["loss_scale"] for row in diagnosis["history"]]
    assert scales[-1] < scales[0]  # the scale backed off all the way
    for tag in (run / "checkpoints").glob("step*"):  # no checkpoint with non-finite weights
        state = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        assert all(torch.isfinite(t).all() for t in state["module"].values() if t.is_floating_point())
    return summary, diagnosis


@pytest.mark.slow  # fp16 B0 on a CPU: about a minute each
def test_label_smoothing_as_log_of_softmax_in_fp16_goes_inf_and_is_reported(cli, tmp_path):
    result, run = run_variant(cli, tmp_path, "fp16-smoothing-inf")
    summary, diagnosis = assert_collapsed_with_diagnosis(result, run)
    losses = [row["loss"] for row in read_jsonl(run / "metrics.jsonl") if "loss" in row]
    assert losses and all(loss == "inf" for loss in losses)  # written as "inf": JSON has no infinity
    # every layer is finite; the loss itself is the first non-finite value
    assert diagnosis["first_nonfinite_forward"]["module"] == "loss"
    assert summary["skipped_steps"] == summary["steps"]


@pytest.mark.slow
def test_torch_rmsprop_in_fp16_diverges_and_the_collapse_names_a_module(cli, tmp_path):
    result, run = run_variant(cli, tmp_path, "fp16-rmsprop-stress")
    summary, diagnosis = assert_collapsed_with_diagnosis(result, run)
    culprit = diagnosis["first_nonfinite_forward"] or diagnosis["first_nonfinite_gradient"]
    assert culprit and culprit["module"]
    assert summary["steps"] < 200  # caught early, not after a whole run on NaN
    norms = diagnosis["culprit_weight_norms"]  # the named layer (or the nearest one above with weights), per step
    assert culprit["module"].startswith(norms["module"]) and norms["weights"]
    assert norms["steps"] == [row["step"] for row in diagnosis["history"]]
    assert all(len(row) == len(norms["weights"]) for row in norms["norms"])
