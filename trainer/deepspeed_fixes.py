"""What DeepSpeed (0.19) does not do for this trainer, each fixed in one place and used only by
trainer/engine.py, which wraps the engine for the loop:

- it refuses fp16 on a CPU without fast fp16 kernels, although PyTorch computes it (opt-in); there,
  convolutions and linear layers compute from their half inputs in fp32 and round to half, as a GPU's
  fp16 kernels do, because PyTorch's own CPU half kernels are ~11x slower than fp32;
- its fp16/bf16 modes cast every parameter, BN included, to half while BN buffers stay fp32, and
  CPU batch_norm rejects that mix: batch norm is computed in fp32;
- at ZeRO 0 with a client optimizer (FP16_UnfusedOptimizer), engine.backward does not scale the loss
  although step() unscales the gradients: the loss is scaled here;
- the same wrapper runs one optimizer step on zero gradients while initializing: its state is dropped;
- in fp32 at ZeRO 0 it neither skips a non-finite step nor reports a gradient norm: a guard does both.

ds_configs/README.md says why fp16 goes through DeepSpeed's `fp16` section and not `torch_autocast`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ConfigError


def check_precision_supported(precision: str, allow_cpu_fp16: bool) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if precision == "fp16" and not accelerator.is_fp16_supported():
        if accelerator.device_name() != "cpu" or not allow_cpu_fp16:
            raise ConfigError(f"engine.precision=fp16: DeepSpeed does not support fp16 on this "
                              f"{accelerator.device_name()}; use bf16 or fp32, or set engine.allow_cpu_fp16=true "
                              f"to run it on the CPU anyway (slow)")
        # explicit opt-in: PyTorch computes fp16 on the CPU, only without fast kernels
        type(accelerator).is_fp16_supported = lambda self: True
    if precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(f"engine.precision=bf16: not supported on this {accelerator.device_name()}; use fp32")


_FP32_CLASSES: dict[type, type] = {}


def _fp32_class(cls: type) -> type:
    """A subclass of a module class whose forward runs in fp32 and returns the input's dtype."""
    if cls not in _FP32_CLASSES:
        class FP32Module(cls):
            def forward(self, x):
                params = dict(self.named_parameters(recurse=False))
                if x.dtype == torch.float32 and all(p.dtype == torch.float32 for p in params.values()):
                    return super().forward(x)
                fp32_params = {name: p.float() for name, p in params.items()}  # differentiable casts
                with torch.autocast(device_type=x.device.type, enabled=False):
                    out = torch.func.functional_call(self, fp32_params, (x.float(),))
                return out.to(x.dtype)

        FP32Module.__name__ = FP32Module.__qualname__ = f"FP32{cls.__name__}"
        _FP32_CLASSES[cls] = FP32Module
    return _FP32_CLASSES[cls]


def _compute_in_fp32(model: nn.Module, kinds: tuple[type, ...]) -> int:
    """Swap the class of every module of these kinds for its fp32-computing subclass. Only the class
    changes (state_dict keys and isinstance checks stay), so it works whatever DeepSpeed does with the
    parameters: at ZeRO 1/2 they are views into its flat half buffer, re-pointed after every step.
    Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, kinds) and type(module) not in _FP32_CLASSES.values():
            module.__class__ = _fp32_class(type(module))
            changed += 1
    return changed


def batchnorm_in_fp32(model: nn.Module) -> int:
    """Make every BatchNorm compute in fp32 against its fp32 running stats."""
    return _compute_in_fp32(model, (nn.modules.batchnorm._BatchNorm,))


def convolutions_in_fp32(model: nn.Module) -> int:
    """fp16 on the CPU: PyTorch's half convolutions there take a slow generic path (~11x slower than
    fp32 for B0, most of it in the depthwise backward). Convolutions and linear layers compute from
    their half inputs and weights in fp32 and round the result to half, forward and backward: what a
    GPU's fp16 kernels do (fp32 accumulation), at fp32 speed. Activations, gradients and weights stay
    half, so overflow, loss scaling and skipped steps are fp16's."""
    return _compute_in_fp32(model, (nn.Conv2d, nn.Linear))


def unfused_fp16(engine) -> bool:
    """ZeRO 0 with a client optimizer in fp16: DeepSpeed's FP16_UnfusedOptimizer."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return engine.fp16_enabled() and isinstance(engine.optimizer, FP16_UnfusedOptimizer)


def scaled_for_unfused_fp16(engine, loss: torch.Tensor) -> torch.Tensor:
    """DeepSpeed 0.19 bug: FP16_UnfusedOptimizer divides gradients by its scale in step(), but
    engine.backward never multiplied the loss by it (updates came out 1/scale too small)."""
    return loss * engine.optimizer.loss_scale if unfused_fp16(engine) else loss


def forget_initialize_step(engine, optimizer: torch.optim.Optimizer) -> None:
    """DeepSpeed's ZeRO-0 fp16/bf16 wrapper runs one optimizer step on zero gradients while it
    initializes, to create the state: drop that state so the first real step starts fresh
    (RMSProp-TF's square average must start at 1, not 0.9)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        optimizer.state.clear()


class SkipNonFiniteStep(torch.optim.Optimizer):
    """Wraps an optimizer so that a step with any non-finite gradient changes nothing.

    DeepSpeed skips such steps itself in fp16/bf16 and under ZeRO 1/2, but in fp32 at
    ZeRO 0 it calls the plain optimizer, which would write NaN into the weights.
    Delegates like timm's Lookahead: same param_groups and state objects."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.last_step_skipped = False
        self.last_grad_norm = None

    @property
    def state(self):
        return self.optimizer.state

    def __getstate__(self):
        return self.optimizer.__getstate__()

    def __repr__(self):
        return f"SkipNonFiniteStep({self.optimizer!r})"

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # the norm of the gradients DeepSpeed hands over: after its clipping, if clipping is on
        self.last_grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        # note: a device sync per step, as DeepSpeed's own overflow check does in fp16
        self.last_step_skipped = grads != [] and not torch.isfinite(self.last_grad_norm).item()
        if self.last_step_skipped:
            return None
        return self.optimizer.step(closure)
