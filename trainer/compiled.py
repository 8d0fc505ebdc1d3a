"""torch.compile in the trainer (compile.target): the model, or DeepSpeed's engine, compiled in place;
compilations counted, so a run that keeps recompiling says so; the EMA compiled for eval only once
that pays."""
from __future__ import annotations

import torch.nn as nn

from . import log
from .config import CompileConfig


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far: each recompilation adds one."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_model(model: nn.Module, cfg: CompileConfig) -> None:
    """compile.target=model, before DeepSpeed wraps it. nn.Module.compile works in place: the state_dict
    keeps its keys, so checkpoints load into an eager model and back."""
    if cfg.target == "model":
        model.compile(mode=cfg.mode)


def compile_engine(engine, cfg: CompileConfig) -> None:
    """compile.target=engine: DeepSpeed's engine.compile()."""
    if cfg.target == "engine":
        engine.compile(compile_kwargs={"mode": cfg.mode})


class RecompileWatch:
    """Train and eval each compile a graph once (plus one for a smaller last val batch); a graph
    built after the first evaluation's round trip is a recompilation, warned about once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.at_start = compiled_graphs()
        self.settled_at = None  # the graph count once train and eval have both run
        self.eval_seen = False
        self.warned = False

    def after_eval(self, new_graphs_expected: bool = False) -> None:
        """new_graphs_expected: a model was just compiled for eval; settle after its first eval."""
        if new_graphs_expected:
            self.settled_at, self.eval_seen = None, False
        else:
            self.eval_seen = True

    def after_step(self) -> None:
        if self.enabled and self.eval_seen and self.settled_at is None:
            self.settled_at = compiled_graphs()

    def graphs(self) -> int:
        return compiled_graphs() - self.at_start

    def recompiles(self) -> int:
        return 0 if self.settled_at is None else compiled_graphs() - self.settled_at

    def check(self, step: int) -> None:
        if self.recompiles() and not self.warned:
            self.warned = True
            log.warning(f"torch.compile built {self.recompiles()} new graph(s) after warm-up (by step {step}): "
                        f"a shape or a guard changes between steps (TORCH_LOGS=recompiles names it)")


class EmaEvalCompile:
    """The EMA model is only evaluated. Compiling it costs about what compiling the training step
    did; it pays once the eager EMA evaluations still to come would take longer than that."""

    def __init__(self, cfg: CompileConfig):
        self.enabled = cfg.target != "off"
        self.mode = cfg.mode
        self.compiled = False

    def consider(self, ema_module: nn.Module, eval_seconds: float, evals_left: int, compile_seconds: float) -> bool:
        """Compile now if it pays; True when it did."""
        if self.enabled and not self.compiled and eval_seconds * evals_left > compile_seconds:
            ema_module.compile(mode=self.mode)
            self.compiled = True
            return True
        return False
