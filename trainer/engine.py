"""The DeepSpeed engine as the training loop sees it: forward, `backward(loss)` per micro batch, and
`step()` at the end of the global batch, which returns what the optimizer step did (applied or
skipped, the loss scale it used, the gradient norm) and raises `Collapsed` when the run cannot go on.

DeepSpeed owns accumulation, clipping and fp16 loss scaling; the DeepSpeed config is derived from
the trainer's settings (`build_ds_config`). Everything DeepSpeed needs worked around sits behind this
class (trainer/deepspeed_fixes.py), so the loop, the benchmarks and the tests use it the same way."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .config import ConfigError, EngineConfig
from .deepspeed_fixes import (SkipNonFiniteStep, batchnorm_in_fp32, check_precision_supported,
                              convolutions_in_fp32, forget_initialize_step, scaled_for_unfused_fp16,
                              unfused_fp16)
from .health import HealthMonitor, StepRecord
from .plan import RunPlan

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Collapsed(Exception):
    """The run cannot go on: its steps are all being skipped, or its weights are non-finite.
    `batch` (inputs, targets) is the micro batch it happened on, when known, for the diagnosis."""

    def __init__(self, reason: str, step: Optional[int] = None, loss_scale: Optional[float] = None):
        super().__init__(reason)
        self.step = step  # the optimizer step that collapsed (it counts as taken, and skipped)
        self.loss_scale = loss_scale
        self.batch = None


@dataclass
class StepOutcome:
    applied: bool  # False: skipped for overflow or non-finite gradients; nothing changed
    loss_scale: Optional[float]  # the scale this step's gradients were computed with (fp16)
    grad_norm: object  # unscaled global norm before clipping: a float or a 0-d tensor (read lazily)
    # the weights' global norm after the step and the norm of what the step changed, 0-d tensors on the
    # device (read only when logged; update_norm only for a step asked to measure it): their ratio is the
    # step's update-to-weight ratio
    weight_norm: Optional[torch.Tensor] = None
    update_norm: Optional[torch.Tensor] = None


class TrainEngine:
    def __init__(self, ds_engine, optimizer: torch.optim.Optimizer, guard: Optional[SkipNonFiniteStep],
                 monitor: HealthMonitor):
        self.ds = ds_engine  # DeepSpeed's engine: call it for the forward pass (train or eval)
        self.optimizer = optimizer  # the client optimizer: its param groups carry the lr
        self.guard = guard
        self.monitor = monitor
        self.module: nn.Module = ds_engine.module  # the bare model DeepSpeed trains
        self.device = ds_engine.device
        self.input_dtype = next(self.module.parameters()).dtype  # half when DeepSpeed's fp16 casts the model
        self._last_loss = None
        # the weights' norm per tensor after every step, for a collapse's diagnosis: a weight norm
        # that keeps growing shows why no loss scale could make the next step finite
        self.weight_names, self._weights = zip(*self.module.named_parameters())

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.ds(inputs)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def loss_scale(self) -> Optional[float]:
        """The current dynamic loss scale (fp16), None without a loss scaler."""
        if not self.ds.fp16_enabled():
            return None
        return float(self.ds._get_optimizer_loss_scale())

    @property
    def skipped_steps(self) -> int:
        return self.monitor.skipped_steps

    def backward(self, loss: torch.Tensor) -> None:
        """One micro batch's backward. DeepSpeed counts micro batches in its step(): before the last one
        of the global batch it only advances that count (and accumulates), so it is called here."""
        self._last_loss = loss.detach()
        self.ds.backward(scaled_for_unfused_fp16(self.ds, loss))
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()

    def step(self, step: int, measure_update: bool = False) -> StepOutcome:
        """The optimizer step that ends global batch number `step` (1-based): applied, or skipped for
        overflow or non-finite gradients. Raises Collapsed when the run cannot recover. measure_update:
        also the norm of what the step changed (a copy of the weights: only for the steps that are logged)."""
        scale = self.loss_scale()  # the scale this step's gradients were computed with
        before = [w.detach().clone() for w in self._weights] if measure_update else None
        try:
            self.ds.step()
        except Exception as err:  # DeepSpeed 0.19's ZeRO 1/2 scaler raises instead of going below its minimum
            if "loss scale already at minimum" in str(err):
                raise Collapsed("fp16 loss scale reached DeepSpeed's minimum and the step still overflowed",
                                step=step, loss_scale=scale) from err
            raise
        outcome = self._outcome(scale)
        weights = [w.detach() for w in self._weights]  # no autograd graph for bookkeeping
        weight_norms = torch.stack(torch._foreach_norm(weights, 2, dtype=torch.float32))  # stays on the device
        outcome.weight_norm = torch.linalg.vector_norm(weight_norms)
        if before is not None:
            changes = torch._foreach_sub(weights, before)
            outcome.update_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(changes, 2, dtype=torch.float32)))
        collapse = self.monitor.record(StepRecord(step, self._last_loss, outcome.applied, outcome.loss_scale,
                                                  outcome.grad_norm, weight_norms))
        if collapse:
            raise Collapsed(collapse, step=step, loss_scale=scale)
        return outcome

    def _outcome(self, scale_used: Optional[float]) -> StepOutcome:
        if self.guard is not None:  # fp32 at ZeRO 0: DeepSpeed neither skips nor reports a norm
            return StepOutcome(not self.guard.last_step_skipped, None, self.guard.last_grad_norm)
        norm = self.ds.get_global_grad_norm()
        if norm is not None and unfused_fp16(self.ds) and scale_used:
            norm = norm / scale_used  # DeepSpeed 0.19's FP16_UnfusedOptimizer reports the scaled norm
        return StepOutcome(self.ds.was_step_applied(), scale_used, norm)


def resolve_ds_config_path(name: str) -> Path:
    path = Path(name)
    for candidate in (path, PROJECT_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"engine.ds_config: DeepSpeed config {name} not found")


def _require(ds: dict, key: str, value, source: Path, setting: str) -> None:
    """The trainer owns batch, clipping, precision and ZeRO stage; a JSON that says
    otherwise is an error, so the file and the run can never disagree."""
    if ds.get(key, "auto") not in ("auto", value):
        raise ConfigError(f"{source}: {key}={ds[key]!r} contradicts the trainer's {setting}={value!r}; "
                          f"remove it from the file or change {setting}")


def build_ds_config(cfg: EngineConfig, plan: RunPlan) -> dict:
    """The DeepSpeed config: the file's, with the batch from the plan and precision, ZeRO stage and
    clipping from the engine settings filled in."""
    source = resolve_ds_config_path(cfg.ds_config)
    try:
        ds = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: not valid JSON ({err})") from None
    owned = {
        "train_micro_batch_size_per_gpu": (plan.micro_batch, "train.micro_batch"),
        "gradient_accumulation_steps": (plan.grad_accum, "train.grad_accum"),
        "train_batch_size": (plan.global_batch, "world size x train.micro_batch x accumulation"),
        "gradient_clipping": (cfg.grad_clip, "engine.grad_clip"),
    }
    for key, (value, setting) in owned.items():
        _require(ds, key, value, source, setting)
        ds[key] = value
    zero = dict(ds.get("zero_optimization", {}))
    _require(zero, "stage", cfg.zero_stage, source, "engine.zero_stage")
    ds["zero_optimization"] = {**zero, "stage": cfg.zero_stage}
    for section, precision in (("fp16", "fp16"), ("bf16", "bf16")):
        enabled = ds.get(section, {}).get("enabled", "auto")
        if enabled not in ("auto", cfg.precision == precision):
            raise ConfigError(f"{source}: {section}.enabled={enabled} contradicts engine.precision={cfg.precision}")
        ds[section] = {**ds.get(section, {}), "enabled": cfg.precision == precision}
    ds.setdefault("steps_per_print", 2**31 - 1)  # the trainer does its own logging
    if cfg.zero_stage > 0:
        ds.setdefault("zero_allow_untested_optimizer", True)  # RMSProp-TF is not on DeepSpeed's list
    return ds


def check_engine_supported(cfg: EngineConfig) -> None:
    """Refuse a precision this machine's DeepSpeed cannot run (before anything is written)."""
    check_precision_supported(cfg.precision, cfg.allow_cpu_fp16)


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, cfg: EngineConfig
                 ) -> TrainEngine:
    """DeepSpeed's engine around the model and the client optimizer, behind TrainEngine."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if cfg.precision in ("fp16", "bf16"):
        batchnorm_in_fp32(model)  # DeepSpeed casts BN weights to half; BN must still compute in fp32
    if cfg.precision == "fp16" and get_accelerator().device_name() == "cpu":
        convolutions_in_fp32(model)
    guard = SkipNonFiniteStep(optimizer) if cfg.precision == "fp32" and cfg.zero_stage == 0 else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=guard or optimizer, config=ds_config)
    forget_initialize_step(engine, optimizer)
    if engine.dp_world_size == 1 and cfg.zero_stage == 0:
        # DeepSpeed 0.19 at one process would still flatten, all-reduce (with itself) and copy back
        # every gradient at every step
        engine.enable_backward_allreduce = False
    min_scale = ds_config["fp16"].get("min_loss_scale", 1) if cfg.precision == "fp16" else None
    monitor = HealthMonitor(min_scale, cfg.max_consecutive_skips)
    return TrainEngine(engine, optimizer, guard, monitor)
