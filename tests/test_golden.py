"""Golden runs: fixed seed, CPU, the numbers a refactor must not change.

Three short runs through the CLI (the demo recipe on B0; the tiny model in fp16 with DeepSpeed's loss
scaler; the tiny model at ZeRO 2 with accumulation and clipping). Each stores every logged row (per-step
loss, lr, grad norm, loss scale, skips; the evaluations) and a checksum of every final weight tensor in
tests/golden/<name>.json. A code change that moves any of them is a change of the numbers, not a
refactor.

Regenerate only for an intended change of the numbers (and say why in the commit):
    GOLDEN_UPDATE=1 .venv/bin/python -m pytest tests/test_golden.py
The runs use one thread: a reduction split over more threads sums in another order, so the numbers
would depend on the machine's core count. The tolerance absorbs float differences between CPU kernels
(another VM's vector width), not changes of what is computed.
"""
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import TINY, read_jsonl

GOLDEN = Path(__file__).parent / "golden"
COMMON = ["train.log_every_steps=1", "train.eval_every_epochs=0.15", "checkpoint.every_epochs=100",
          "wandb.mode=disabled", "seed=3"]
RUNS = {
    "demo_b0": ["train.max_steps=6", "train.micro_batch=48"],
    "tiny_fp16": [*TINY, "train.max_steps=8", "engine.precision=fp16", "engine.allow_cpu_fp16=true"],
    "tiny_zero2": [*TINY, "train.max_steps=6", "engine.zero_stage=2", "train.grad_accum=2", "engine.grad_clip=0.5"],
}
# timings and compile counters vary run to run; everything else in a row is a number the run computed
VOLATILE = {"images_per_s", "compiled_graphs", "recompiles"}


def final_weights(run: Path) -> dict[str, list[float]]:
    """[sum, sum of squares] of every tensor of the final checkpoint's module state (DeepSpeed's file)."""
    tag = (run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    return {name: [tensor.double().sum().item(), tensor.double().square().sum().item()]
            for name, tensor in state.items() if tensor.is_floating_point()}


def observed(run: Path) -> dict:
    rows = [{k: v for k, v in row.items() if k not in VOLATILE} for row in read_jsonl(run / "metrics.jsonl")]
    return {"rows": rows, "weights": final_weights(run)}


def assert_matches(actual, golden, where: str):
    """Exact for ints, bools, strings and None; floats to 1e-5 relative (1e-7 absolute)."""
    if isinstance(golden, dict):
        missing = golden.keys() - actual.keys()
        assert not missing, f"{where}: missing {sorted(missing)}"
        for key in golden:  # a key the golden run did not have (a new metric) is not a change of numbers
            assert_matches(actual[key], golden[key], f"{where}.{key}")
    elif isinstance(golden, list):
        assert len(actual) == len(golden), f"{where}: {len(actual)} items, golden {len(golden)}"
        for i, (a, g) in enumerate(zip(actual, golden)):
            assert_matches(a, g, f"{where}[{i}]")
    elif isinstance(golden, float) and not isinstance(actual, bool):
        assert actual == pytest.approx(golden, rel=1e-5, abs=1e-7), f"{where}: {actual!r}, golden {golden!r}"
    else:
        assert actual == golden, f"{where}: {actual!r}, golden {golden!r}"


@pytest.mark.parametrize("name", RUNS)
def test_golden_run_is_unchanged(cli, tmp_path, name):
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *COMMON, *RUNS[name], env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    got = observed(tmp_path / "run")
    path = GOLDEN / f"{name}.json"
    if os.environ.get("GOLDEN_UPDATE"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"overrides": RUNS[name], **got}, indent=1) + "\n")
    golden = json.loads(path.read_text())
    assert golden["overrides"] == RUNS[name], "the run's settings changed: regenerate the golden file"
    assert any(row.get("top1") is not None for row in golden["rows"]) and len(golden["weights"]) > 10
    assert_matches(got, {"rows": golden["rows"], "weights": golden["weights"]}, name)
