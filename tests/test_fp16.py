"""fp16 through DeepSpeed's loss scaler for a BatchNorm network, on the CPU (with the opt-in),
at ZeRO 0, 1 and 2; non-finite steps skipped in every precision."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import GROUP_VARIABLES
from trainer import precision
from trainer.config import ConfigError, load_config
from trainer.engine import build_ds_config, build_ema, build_engine, init_distributed
from trainer.model import build_model
from trainer.optim import build_optimizer

SCALER = {"initial_scale_power": 8, "loss_scale_window": 3, "hysteresis": 1, "min_loss_scale": 1}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    init_distributed()


def make_engine(tmp_path, precision_name, zero_stage, *overrides):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"fp16": SCALER}))
    cfg = load_config("demo", ["model.name=test_efficientnet", f"train.precision={precision_name}",
                               f"train.zero_stage={zero_stage}", "train.allow_cpu_fp16=true",
                               f"train.ds_config={ds_file}", "train.micro_batch=8", "train.ema_decay=0.5",
                               "optim.name=rmsproptf", "optim.nesterov=false", "optim.weight_decay=1e-5", *overrides])
    precision.check_precision_supported(cfg.train.precision, cfg.train.allow_cpu_fp16)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10)
    ema = build_ema(model, cfg.train, "cpu")
    optimizer = build_optimizer(cfg.optim, model, lr=0.01)
    engine, guard = build_engine(model, optimizer, build_ds_config(cfg.train, 1), cfg.train)
    return engine, guard, ema


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def step(engine, guard, ema, x, y, step_index, poison=False):
    """One trainer step as in loop.fit; `poison` makes the loss (so every gradient) non-finite."""
    scale = precision.loss_scale(engine)
    loss = F.cross_entropy(engine(x.to(next(engine.module.parameters()).dtype)).float(), y)
    if poison:
        loss = loss * float("inf")
    precision.backward(engine, loss)
    engine.step()
    outcome = precision.step_outcome(engine, guard, scale)
    if outcome.applied:
        ema.update(engine.module, step=step_index)
    return outcome


def snapshot(engine, ema):
    return ({k: v.clone() for k, v in engine.module.named_parameters()},
            {k: v.clone() for k, v in ema.module.state_dict().items()})


def assert_identical(before, after):
    for part_before, part_after in zip(before, after):
        for name in part_before:
            assert torch.equal(part_before[name], part_after[name]), name


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_fp16_scale_backs_off_skips_bit_exactly_and_grows(tmp_path, zero_stage):
    engine, guard, ema = make_engine(tmp_path, "fp16", zero_stage)
    bn = [m for m in engine.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn and all(m.running_mean.dtype == torch.float32 for m in bn)  # BN statistics stay fp32
    data = batches(8)
    assert precision.loss_scale(engine) == 256
    for i in range(2):
        assert step(engine, guard, ema, *data[i], i).applied
    before = snapshot(engine, ema)
    outcome = step(engine, guard, ema, *data[2], 2, poison=True)  # overflow injected at step k=2
    assert not outcome.applied and engine.skipped_steps == 1
    assert_identical(before, snapshot(engine, ema))  # weights and EMA untouched by the skipped step
    assert precision.loss_scale(engine) == 128  # backed off
    scales = [precision.loss_scale(engine)]
    for i in range(3, 8):
        assert step(engine, guard, ema, *data[i], i).applied
        scales.append(precision.loss_scale(engine))
    assert max(scales) == 256  # grew back after loss_scale_window good steps
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_fp16_update_matches_fp32_at_zero_0(tmp_path):
    """Pins the ZeRO-0 loss-scaling fix: without it the update is 1/scale too small."""
    updates = {}
    x, y = batches(1)[0]
    for name in ("fp32", "fp16"):
        engine, guard, ema = make_engine(tmp_path, name, 0, "optim.name=sgd", "optim.momentum=0",
                                         "optim.weight_decay=0")
        before = {k: v.float().clone() for k, v in engine.module.named_parameters()}
        assert step(engine, guard, ema, x, y, 0).applied
        updates[name] = torch.cat([(v.float() - before[k]).flatten() for k, v in engine.module.named_parameters()])
    ratio = updates["fp16"].norm() / updates["fp32"].norm()
    assert 0.9 < ratio < 1.1


@pytest.mark.parametrize("precision_name, zero_stage", [("bf16", 0), ("bf16", 2), ("fp32", 0), ("fp32", 1)])
def test_non_finite_step_is_skipped_and_counted_in_every_precision(tmp_path, precision_name, zero_stage):
    engine, guard, ema = make_engine(tmp_path, precision_name, zero_stage)
    data = batches(3)
    assert step(engine, guard, ema, *data[0], 0).applied
    before = snapshot(engine, ema)
    assert not step(engine, guard, ema, *data[1], 1, poison=True).applied
    assert_identical(before, snapshot(engine, ema))
    assert step(engine, guard, ema, *data[2], 2).applied


def test_fp32_zero_stages_give_the_same_losses(tmp_path):
    losses = {}
    for zero_stage in (0, 1, 2):
        engine, guard, ema = make_engine(tmp_path, "fp32", zero_stage)
        curve = []
        for i, (x, y) in enumerate(batches(5)):
            loss = F.cross_entropy(engine(x), y)
            precision.backward(engine, loss)
            engine.step()
            curve.append(loss.item())
        losses[zero_stage] = curve
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_fp16_on_cpu_without_opt_in_is_refused():
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("only meaningful on the CPU")
    type(get_accelerator()).is_fp16_supported = lambda self: False  # undo an earlier test's opt-in
    with pytest.raises(ConfigError, match="allow_cpu_fp16"):
        precision.check_precision_supported("fp16", allow_cpu_fp16=False)


def test_gpu_precision_benchmark_script_runs(tmp_path):
    """launch/bench_precision.py is meant for a GPU; a tiny CPU run keeps it from rotting."""
    env = {k: v for k, v in os.environ.items() if k not in GROUP_VARIABLES}
    script = Path(__file__).resolve().parent.parent / "launch" / "bench_precision.py"
    result = subprocess.run([sys.executable, str(script), "--model", "test_efficientnet", "--size", "32",
                             "--batch", "8", "--steps", "6", "--allow-cpu-fp16"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fp16:" in result.stdout and "bf16:" in result.stdout and "loss-scale trace" in result.stdout


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_fp16_clipping_is_deepspeeds_on_unscaled_gradients(tmp_path, zero_stage):
    """SGD with lr 1 and no momentum moves the weights by exactly the clipped gradient: norm 1."""
    engine, guard, ema = make_engine(tmp_path, "fp16", zero_stage, "optim.name=sgd", "optim.momentum=0",
                                     "optim.weight_decay=0", "train.grad_clip=1.0")
    for group in engine.optimizer.param_groups:
        group["lr"] = 1.0
    x, y = batches(1)[0]
    before = {k: v.float().clone() for k, v in engine.module.named_parameters()}
    outcome = step(engine, guard, ema, x, y, 0)
    while not outcome.applied:  # the first steps may overflow at the initial scale
        before = {k: v.float().clone() for k, v in engine.module.named_parameters()}
        outcome = step(engine, guard, ema, x, y, 0)
    assert float(outcome.grad_norm) > 1.0  # so clipping did act
    update = torch.cat([(v.float() - before[k]).flatten() for k, v in engine.module.named_parameters()])
    assert update.norm().item() == pytest.approx(1.0, rel=0.02)  # fp16 weights: rounding of the copy
