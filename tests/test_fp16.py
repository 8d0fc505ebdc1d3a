"""fp16 through DeepSpeed's loss scaler for a BatchNorm network, on the CPU (with the opt-in),
at ZeRO 0, 1 and 2; non-finite steps skipped in every precision."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import GROUP_VARIABLES
from trainer.config import ConfigError, EngineConfig, load_config
from trainer.distributed import init_distributed
from trainer.ema import build_ema
from trainer.engine import build_ds_config, build_engine, check_engine_supported
from trainer.loss import build_loss
from trainer.model import build_model
from trainer.optim import build_optimizer
from trainer.plan import RunPlan
from trainer.step import StepParts, train_step

SCALER = {"initial_scale_power": 8, "loss_scale_window": 3, "hysteresis": 1, "min_loss_scale": 1}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    init_distributed()


def make_engine(tmp_path, precision_name, zero_stage, *overrides):
    """The trainer's engine wrapper and EMA around the tiny model, one process, micro batch 8."""
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"fp16": SCALER}))
    cfg = load_config("demo", ["model.name=test_efficientnet", f"engine.precision={precision_name}",
                               f"engine.zero_stage={zero_stage}", "engine.allow_cpu_fp16=true",
                               f"engine.ds_config={ds_file}", "train.micro_batch=8", "ema.decay=0.5",
                               "optim.name=rmsproptf", "optim.nesterov=false", "optim.weight_decay=1e-5", *overrides])
    check_engine_supported(cfg.engine)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10)
    ema = build_ema(model, cfg.ema, "cpu")
    optimizer = build_optimizer(cfg.optim, model, lr=0.01)
    plan = RunPlan.build(cfg.train, cfg.checkpoint, 0.0, world_size=1, train_images=80, micro_batches_per_epoch=10)
    engine = build_engine(model, optimizer, build_ds_config(cfg.engine, plan), cfg.engine)
    return engine, StepParts(engine, ema, build_loss(cfg.loss), l2_penalty=None, batch_augment=None,
                             channels_last=False)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def step(parts, x, y, step_index, poison=False):
    """One trainer step, the loop's own (trainer/step.py); `poison` makes the loss (so every gradient)
    non-finite. Returns the step's outcome."""
    if poison:
        loss = parts.criterion
        parts = dataclasses.replace(parts, criterion=lambda logits, targets: loss(logits, targets) * math.inf)
    lr = parts.engine.optimizer.param_groups[0]["lr"]
    return train_step(parts, [(x, y)], epoch=0, first_batch=step_index, step=step_index, lr=lr).outcome


def snapshot(parts):
    return ({k: v.clone() for k, v in parts.engine.module.named_parameters()},
            {k: v.clone() for k, v in parts.ema.module.state_dict().items()})


def assert_identical(before, after):
    for part_before, part_after in zip(before, after):
        for name in part_before:
            assert torch.equal(part_before[name], part_after[name]), name


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_fp16_scale_backs_off_skips_bit_exactly_and_grows(tmp_path, zero_stage):
    engine, parts = make_engine(tmp_path, "fp16", zero_stage)
    bn = [m for m in engine.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn and all(m.running_mean.dtype == torch.float32 for m in bn)  # BN statistics stay fp32
    data = batches(8)
    assert engine.loss_scale() == 256
    for i in range(2):
        assert step(parts, *data[i], i).applied
    before = snapshot(parts)
    outcome = step(parts, *data[2], 2, poison=True)  # overflow injected at step k=2
    assert not outcome.applied and engine.skipped_steps == 1
    assert_identical(before, snapshot(parts))  # weights and EMA untouched by the skipped step
    assert engine.loss_scale() == 128  # backed off
    scales = [engine.loss_scale()]
    for i in range(3, 8):
        assert step(parts, *data[i], i).applied
        scales.append(engine.loss_scale())
    assert max(scales) == 256  # grew back after loss_scale_window good steps
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_fp16_update_matches_fp32_at_zero_0(tmp_path):
    """Pins the ZeRO-0 loss-scaling fix: without it the update is 1/scale too small."""
    updates = {}
    x, y = batches(1)[0]
    for name in ("fp32", "fp16"):
        engine, parts = make_engine(tmp_path, name, 0, "optim.name=sgd", "optim.momentum=0",
                                         "optim.weight_decay=0")
        before = {k: v.float().clone() for k, v in engine.module.named_parameters()}
        assert step(parts, x, y, 0).applied
        updates[name] = torch.cat([(v.float() - before[k]).flatten() for k, v in engine.module.named_parameters()])
    ratio = updates["fp16"].norm() / updates["fp32"].norm()
    assert 0.9 < ratio < 1.1


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_fp16_on_the_cpu_computes_convolutions_as_a_gpu_does(tmp_path, zero_stage):
    """Half inputs and weights, fp32 accumulation, the result rounded to half, forward and backward
    (PyTorch's own CPU half convolutions are ~11x slower)."""
    engine, _ = make_engine(tmp_path, "fp16", zero_stage)
    layers = [m for m in engine.module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert layers and all(type(m).__name__.startswith("FP32") for m in layers)
    conv = next(m for m in layers if isinstance(m, torch.nn.Conv2d) and m.groups > 1)  # a depthwise one
    assert conv.weight.dtype == torch.float16
    x = torch.randn(4, conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    x.requires_grad_(True)
    out = conv(x)
    out.float().square().sum().backward()
    weight = conv.weight.detach().float().requires_grad_(True)
    x32 = x.detach().float().requires_grad_(True)
    expected = torch.nn.functional.conv2d(x32, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    expected.half().float().square().sum().backward()
    assert out.dtype == torch.float16 and torch.equal(out, expected.half())
    assert x.grad.dtype == torch.float16 and torch.equal(x.grad, x32.grad.half())
    assert torch.equal(conv.weight.grad, weight.grad.half())


@pytest.mark.parametrize("precision_name, zero_stage", [("bf16", 0), ("bf16", 2), ("fp32", 0), ("fp32", 1)])
def test_non_finite_step_is_skipped_and_counted_in_every_precision(tmp_path, precision_name, zero_stage):
    engine, parts = make_engine(tmp_path, precision_name, zero_stage)
    data = batches(3)
    assert step(parts, *data[0], 0).applied
    before = snapshot(parts)
    assert not step(parts, *data[1], 1, poison=True).applied
    assert_identical(before, snapshot(parts))
    assert step(parts, *data[2], 2).applied


def test_fp32_zero_stages_give_the_same_losses(tmp_path):
    losses = {}
    for zero_stage in (0, 1, 2):
        engine, parts = make_engine(tmp_path, "fp32", zero_stage)
        losses[zero_stage] = [train_step(parts, [(x, y)], 0, i, i, lr=0.01).losses[0].item()
                              for i, (x, y) in enumerate(batches(5))]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_fp16_on_cpu_without_opt_in_is_refused():
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("only meaningful on the CPU")
    type(get_accelerator()).is_fp16_supported = lambda self: False  # undo an earlier test's opt-in
    with pytest.raises(ConfigError, match="allow_cpu_fp16"):
        check_engine_supported(EngineConfig(precision="fp16", allow_cpu_fp16=False))


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
    engine, parts = make_engine(tmp_path, "fp16", zero_stage, "optim.name=sgd", "optim.momentum=0",
                                     "optim.weight_decay=0", "engine.grad_clip=1.0")
    for group in engine.optimizer.param_groups:
        group["lr"] = 1.0
    x, y = batches(1)[0]
    before = {k: v.float().clone() for k, v in engine.module.named_parameters()}
    outcome = step(parts, x, y, 0)
    while not outcome.applied:  # the first steps may overflow at the initial scale
        before = {k: v.float().clone() for k, v in engine.module.named_parameters()}
        outcome = step(parts, x, y, 0)
    assert float(outcome.grad_norm) > 1.0  # so clipping did act
    update = torch.cat([(v.float() - before[k]).flatten() for k, v in engine.module.named_parameters()])
    assert update.norm().item() == pytest.approx(1.0, rel=0.02)  # fp16 weights: rounding of the copy
