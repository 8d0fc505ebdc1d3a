"""Run health: skipped-step bookkeeping, collapse detection, and a diagnosis naming the
first module whose output or gradient went non-finite.

A collapsing fp16 run looks alive: the loss scaler skips every step, the scale halves
towards its minimum, and the weights stop moving. This module says so early."""
from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .track import write_json_atomic


@dataclass
class StepRecord:
    step: int
    loss: torch.Tensor  # kept on the device; read only when a diagnosis is written
    applied: bool
    loss_scale: Optional[float]
    grad_norm: Optional[float]
    weight_norms: Optional[torch.Tensor] = None  # one per parameter tensor, on the device


@dataclass
class HealthMonitor:
    min_loss_scale: Optional[float]  # DeepSpeed's fp16 minimum; None without a loss scaler
    max_consecutive_skips: int
    skipped_steps: int = 0
    consecutive_skips: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=100))

    def record(self, rec: StepRecord) -> Optional[str]:
        """Book one optimizer step; return why the run has collapsed, or None."""
        self.history.append(rec)
        if rec.applied:
            self.consecutive_skips = 0
            return None
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.min_loss_scale is not None and rec.loss_scale is not None and rec.loss_scale <= self.min_loss_scale:
            return (f"fp16 loss scale reached DeepSpeed's minimum ({self.min_loss_scale:g}) and the step "
                    f"still overflowed")
        if self.consecutive_skips >= self.max_consecutive_skips:
            return (f"{self.consecutive_skips} consecutive steps had non-finite gradients or loss and were skipped "
                    f"(engine.max_consecutive_skips={self.max_consecutive_skips})")
        return None

    def history_rows(self) -> list[dict]:
        return [{"step": r.step, "loss": _float(r.loss), "applied": r.applied, "loss_scale": r.loss_scale,
                 "grad_norm": r.grad_norm} for r in self.history]


def weight_norm_history(monitor: HealthMonitor, names: list[str], module: Optional[str]) -> dict:
    """Per step of the history: the norm of each weight of `module`, or of the nearest module above it
    that has weights (an activation has none)."""
    while module and not any(name.rpartition(".")[0] == module for name in names):
        module = module.rpartition(".")[0]
    if not module:
        return {}
    wanted = [i for i, name in enumerate(names) if name.rpartition(".")[0] == module]
    rows = [(r.step, r.weight_norms[wanted].tolist()) for r in monitor.history if r.weight_norms is not None]
    return {"module": module, "weights": [names[i] for i in wanted],
            "steps": [step for step, _ in rows], "norms": [norms for _, norms in rows]}


def _float(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no inf/NaN


def _not_finite(value) -> bool:
    tensors = value if isinstance(value, (tuple, list)) else (value,)
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all() for t in tensors)


def first_nonfinite_modules(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn,
                            loss_scale: float = 1.0) -> dict:
    """Replay one batch on a detached copy of the model (so the engine's gradient hooks and
    BN statistics are untouched) and name the first module, in execution order, whose forward
    output is non-finite, and the first, in backward order, whose output gradient is."""
    replica = copy.deepcopy(model).train()
    for module in replica.modules():  # backward hooks cannot watch a tensor an in-place op rewrites
        if hasattr(module, "inplace"):
            module.inplace = False
    found = {"forward": None, "backward": None}
    order = []  # leaf modules in execution order

    def on_forward(name):
        def hook(module, args, output):
            order.append((name, module))
            if found["forward"] is None and _not_finite(output):
                found["forward"] = {"module": name, "type": type(module).__name__}
        return hook

    def on_backward(name):
        def hook(module, grad_input, grad_output):
            if found["backward"] is None and _not_finite(grad_output):
                found["backward"] = {"module": name, "type": type(module).__name__}
        return hook

    handles = []
    for name, module in replica.named_modules():
        if name and not list(module.children()):  # leaves: the layers that compute
            handles.append(module.register_forward_hook(on_forward(name)))
            handles.append(module.register_full_backward_hook(on_backward(name)))
    inputs = inputs.detach().clone().requires_grad_(True)
    loss = loss_fn(replica(inputs), targets)  # exactly as train_step: the loss picks its precision
    found["loss"] = _float(loss.detach())
    if found["forward"] is None and not torch.isfinite(loss):  # every layer finite: the loss itself
        found["forward"] = {"module": "loss", "type": getattr(loss_fn, "__name__", type(loss_fn).__name__)}
    (loss * loss_scale).backward()  # the scaled backward the engine ran
    for handle in handles:
        handle.remove()
    if found["backward"] is None:  # outputs' gradients finite: a weight gradient may still overflow
        for name, module in reversed(order):  # backward order
            if any(p.grad is not None and _not_finite(p.grad) for p in module.parameters(recurse=False)):
                found["backward"] = {"module": name, "type": type(module).__name__, "what": "weight gradient"}
                break
    return found


def write_diagnosis(run_dir: Path, reason: str, step: int, modules: dict, monitor: HealthMonitor,
                    precision: str, weight_names: list[str]) -> dict:
    history = monitor.history_rows()
    culprit = modules.get("forward") or modules.get("backward")
    advice = {
        "fp16": "fp16 overflowed on every step: use bf16 (no loss scaler, fp32 range), lower the lr, or fix the "
                "module named above (a loss computed as log(softmax) in fp16, an unstable optimizer such as "
                "torch's RMSprop without TF's eps placement)",
    }.get(precision, "the loss or gradients are non-finite in full range: lower the lr or check the module above")
    diagnosis = {"reason": reason, "step": step, "precision": precision, "skipped_steps": monitor.skipped_steps,
                 "first_nonfinite_forward": modules.get("forward"), "first_nonfinite_gradient": modules.get("backward"),
                 "replayed_loss": modules.get("loss"), "advice": advice, "history": history,
                 "culprit_weight_norms": weight_norm_history(monitor, weight_names, culprit and culprit["module"])}
    write_json_atomic(run_dir / "diagnosis.json", diagnosis)
    lines = [f"# Run collapsed at step {step}", "", f"**Why:** {reason}.", ""]
    if culprit:
        where = ("forward output" if modules.get("forward") else "gradient")
        lines.append(f"**First non-finite {where}:** `{culprit['module']}` ({culprit['type']}), found by replaying "
                     f"the offending batch with hooks on every layer.")
    else:
        lines.append("Replaying the offending batch found no non-finite output or gradient in any layer: "
                     "the overflow came from the loss scale itself.")
    if modules.get("forward") and modules.get("backward"):
        lines.append(f"First non-finite gradient (backward order): `{modules['backward']['module']}`.")
    norms = diagnosis["culprit_weight_norms"]
    if norms.get("steps"):
        first, last = (sum(n * n for n in row) ** 0.5 for row in (norms["norms"][0], norms["norms"][-1]))
        lines.append(f"Weight norm of `{norms['module']}` from step {norms['steps'][0]} to {norms['steps'][-1]}: "
                     f"{first:.4g} -> {last:.4g}.")
    lines += ["", f"**What to do:** {advice}.", "", "## The steps leading up to it", "",
              "| step | loss | loss scale | applied | grad norm |", "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['loss']} | {r['loss_scale']} | {r['applied']} | {r['grad_norm']} |" for r in history]
    (run_dir / "diagnosis.md").write_text("\n".join(lines) + "\n")
    return diagnosis


def all_finite(module: nn.Module) -> bool:
    # one device sync for the whole model, not one per tensor
    flags = [torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True
