"""torch.compile, channels_last, the trainer's own cost (`bench train`) and host syncs per step."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import GROUP_VARIABLES, REPO, TINY, read_jsonl

TWO_EVALS = [*TINY, "train.epochs=2", "train.log_every_steps=5", "wandb.mode=disabled"]


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("setting", ["model", pytest.param("engine", marks=pytest.mark.slow)])
def test_compiled_run_trains_and_train_and_eval_do_not_recompile_each_other(cli, tmp_path, setting):
    # two epochs: train, eval, train, eval, so each mode runs again after the other
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *TWO_EVALS, f"compile.target={setting}",
                 env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "completed" and summary["top1"] > 30  # it learns
    # one graph for train, one for eval, one for the smaller last val batch
    assert 2 <= summary["compiled_graphs"] <= 4 and summary["recompiles"] == 0
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["compiled_graphs"] == summary["compiled_graphs"] and rows[-1]["recompiles"] == 0
    assert "recompiled" not in result.stderr and "new graph" not in result.stderr


@pytest.mark.slow
def test_compiled_checkpoint_resumes_eagerly_with_the_same_keys(cli, tmp_path):
    """nn.Module.compile works in place: the checkpoint's keys are the eager model's, and the
    execution settings (compile, channels_last) may change when a run resumes."""
    first = cli("train", "--recipe", "demo", "--run-dir", "run", *TWO_EVALS, "compile.target=model",
                "--stop-at-step", "50", env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))
    keys = list(torch.load(ckpt, map_location="cpu", weights_only=False)["module"])
    assert keys and not any("_orig_mod" in k for k in keys)
    second = cli("train", "--recipe", "demo", "--run-dir", "run", *TWO_EVALS, "compile.channels_last=true",
                 "--resume", env={"OMP_NUM_THREADS": "1"})
    assert second.returncode == 0, second.stderr[-3000:]
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 89  # 2 epochs of 1438 / 32 = 44.94 steps (TF's count)


def test_channels_last_inputs_make_the_activations_nhwc():
    from trainer.config import ModelConfig
    from trainer.data.loaders import normalize
    from trainer.model import build_model

    model = build_model(ModelConfig(name="test_efficientnet"), num_classes=10)
    seen = []
    model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(out))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    model(normalize(images, "cpu", channels_last=True))
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    model(normalize(images, "cpu"))
    assert seen[1].is_contiguous()


def test_bench_train_prints_bare_eager_and_compiled_rows(cli):
    result = cli("bench", "train", "--model", "test_efficientnet", "--image-size", "16", "--batch", "16",
                 "--steps", "12", "--window", "4", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = {line[:28].strip(): line[28:].split() for line in lines if line.startswith(("bare", "trainer"))}
    assert list(rows) == ["bare PyTorch loop", "trainer, eager", "trainer, compile=model"]
    bare, eager, compiled = (float(r[0]) for r in rows.values())
    assert min(bare, eager, compiled) > 0
    assert float(rows["trainer, eager"][1]) == pytest.approx(eager / bare, abs=1e-3)  # the ratio column
    assert float(rows["trainer, compile=model"][2]) == pytest.approx(compiled / eager, abs=1e-3)
    assert int(rows["trainer, compile=model"][4]) >= 1  # graphs built
    assert any(line.startswith("compile time") for line in lines)


SYNC_COUNTER = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    import torch
    from trainer.config import load_config
    from trainer.loop import fit

    counts = {"n": 0}
    def counting(method):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            # the trainer's own reads of a tensor's value; the input pipeline (trainer/data/) reads host tensors
            if "/trainer/" in caller and "/trainer/data/" not in caller:
                counts["n"] += 1
            return method(self, *args, **kwargs)
        return wrapper
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))

    steps = int(sys.argv[1])
    cfg = load_config("demo", ["model.name=test_efficientnet", "data.image_size=16", "train.micro_batch=16",
                               "engine.precision=bf16", f"train.max_steps={steps}", f"train.log_every_steps={steps}",
                               "train.eval_every_epochs=1000", "checkpoint.every_epochs=1000",
                               "wandb.mode=disabled"])
    fit(cfg, Path(tempfile.mkdtemp()) / "run", None)
    print(json.dumps(counts))
""")


def test_steps_between_logging_steps_read_no_tensor_values():
    """On a GPU every read of a tensor's value waits for the device. The trainer's own code reads
    values at logging, evaluation and checkpoint steps only: a run of 40 steps makes exactly as many
    reads as a run of 10 with the same single logging step, evaluation and checkpoint."""
    # not this process's group variables (an in-process run of an earlier test set them): its own group
    env = {**{k: v for k, v in os.environ.items() if k not in GROUP_VARIABLES}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    reads = []
    for steps in (10, 40):
        out = subprocess.run([sys.executable, "-c", SYNC_COUNTER, str(steps)], capture_output=True, text=True,
                             env=env, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        reads.append(json.loads(out.stdout.strip().splitlines()[-1])["n"])
    assert reads[0] == reads[1] and reads[0] > 0


def test_ema_is_compiled_for_eval_only_once_the_evals_to_come_cost_more_than_compiling():
    from trainer.compiled import EmaEvalCompile
    from trainer.config import CompileConfig

    module = torch.nn.Linear(2, 2)
    assert not EmaEvalCompile(CompileConfig(target="off")).consider(module, 10.0, 100, 1.0)  # never without compile
    policy = EmaEvalCompile(CompileConfig(target="model"))
    assert not policy.consider(module, eval_seconds=2.0, evals_left=40, compile_seconds=90.0)  # 80 s < 90 s
    assert not hasattr(module, "_compiled_call_impl") or module._compiled_call_impl is None
    assert policy.consider(module, eval_seconds=2.0, evals_left=50, compile_seconds=90.0)  # 100 s > 90 s
    assert module._compiled_call_impl is not None  # nn.Module.compile, in place
    assert not policy.consider(module, eval_seconds=2.0, evals_left=50, compile_seconds=90.0)  # once


def test_channels_last_at_fp32_turns_the_weights_nhwc_and_trains_the_same(cli, tmp_path):
    """At fp32/ZeRO 0 the convolutions' weights go NHWC with the inputs, the fast layout; the
    numbers are the NCHW run's up to float rounding."""
    losses = {}
    for layout in ("false", "true"):
        result = cli("train", "--recipe", "demo", "--run-dir", f"run-{layout}", *TINY, "train.max_steps=6",
                     "train.log_every_steps=1", "wandb.mode=disabled", f"compile.channels_last={layout}",
                     env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        losses[layout] = [r["loss"] for r in read_jsonl(tmp_path / f"run-{layout}" / "metrics.jsonl") if "loss" in r]
    assert len(losses["true"]) == 6 and losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    ckpt = next((tmp_path / "run-true" / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))
    kernels = [t for t in torch.load(ckpt, map_location="cpu", weights_only=False)["module"].values() if t.dim() == 4]
    assert kernels and all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)
