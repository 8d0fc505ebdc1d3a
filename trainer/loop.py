"""The training run, read top to bottom: `fit` builds the parts and restores, `train` loops
step -> agree on stop -> log -> evaluate -> checkpoint, and closes. The step itself is in step.py.

    python -m trainer train --recipe demo
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from . import checkpoint, health, log
from .build import Parts, build_parts
from .compiled import EmaEvalCompile, RecompileWatch
from .config import Config, save_config
from .distributed import Distributed, barrier, init_distributed, mean_over_ranks, union_over_ranks
from .engine import Collapsed
from .evaluate import evaluate_model_and_ema
from .export import code_versions, export_weights
from .optim import peak_lr
from .plan import BatchChange, check_same_batch, rebatch
from .rundir import claim_run_dir
from .runlock import RunLock
from .state import TrainState
from .step import StepResult, train_step
from .stop import StopRequest
from .track import Tracker, write_json_atomic

METRIC_NAMES = ("top1", "top5", "ema_top1", "ema_top5")


def fit(cfg: Config, run_dir: Path | None, resume: str | None, stop_at_step: int | None = None,
        change_batch: bool = False) -> dict:
    """Train `cfg` into `run_dir`. resume: None (a fresh run), "auto" (continue if a checkpoint exists)
    or "required". stop_at_step: behave as if a signal came right after that optimizer step.
    change_batch: a resumed run may continue with another batch (plan.rebatch)."""
    stop = StopRequest(at_step=stop_at_step)
    with stop.handling_signals():  # from the start: a signal during start-up stops the run cleanly too
        dist = init_distributed(cfg.train.collective_timeout_s)
        stop.group = dist.cpu_group
        log.setup_logging(dist.is_main)
        parts = build_parts(cfg, dist)  # may refuse the config: nothing has been written yet
        run = Run.open(cfg, parts, dist, run_dir, resume, change_batch)  # the directory claimed, a checkpoint restored
        return train(run, stop)


def train(run: "Run", stop: StopRequest) -> dict:
    """The loop, from the run's state to its end or an agreed stop: step -> agree on stop -> log ->
    evaluate -> checkpoint. The summary is written whatever ends it."""
    parts, plan, state = run.parts, run.parts.plan, run.state
    status = "failed"
    try:
        stop.agree(state.step)  # a signal during start-up: stop before the first step
        while not plan.is_last(state.step) and stop.agreed is None:
            for micro_batches in steps_of_epoch(parts, state):
                result = train_step(parts.step, micro_batches, state.epoch, state.batches_in_epoch, state.step,
                                    parts.schedule(state.step), plan.logs_at(state.step + 1))  # raises Collapsed
                state.count_step(len(micro_batches), plan.global_batch)
                run.after_step(result)
                stop.agree(state.step)  # every rank stops at the same step, or none does
                if plan.logs_at(state.step):
                    run.log_train(result)
                new_best = run.evaluate() if plan.evaluates_at(state.step) else False
                if plan.checkpoints_at(state.step) or stop.agreed or new_best:
                    run.save_checkpoint(new_best)
                if plan.is_last(state.step) or stop.agreed:
                    break
            else:  # the epoch's batches ran out: the next epoch starts at its first batch
                state.next_epoch()
        status = "completed" if plan.is_last(state.step) else "interrupted"
    except Collapsed as collapse:
        status = "collapsed"
        run.diagnose(collapse)
    except checkpoint.CheckpointWriteError as err:  # a full disk: the previous checkpoint is kept
        run.error = str(err)
        log.error(f"error: {err}")
    finally:
        summary = run.close(status, stop.agreed)
    return summary


def steps_of_epoch(parts: Parts, state: TrainState):
    """The rest of the current epoch as lists of grad_accum micro batches (uint8 images, labels), from
    the micro batch the state is at (mid-epoch after a resume). Micro batches left over at the end of
    an epoch, fewer than one accumulation, are dropped."""
    plan = parts.plan
    parts.loaders.start_epoch(state.epoch, skip_samples=state.batches_in_epoch * plan.micro_batch)
    # whole accumulations from where the state is: steps_per_epoch x grad_accum - batches_in_epoch, except
    # after a batch change that resumed the epoch at a micro batch between two accumulations
    left = (plan.micro_batches_per_epoch - state.batches_in_epoch) // plan.grad_accum * plan.grad_accum
    batches = islice(parts.loaders.train, left)
    while micro_batches := list(islice(batches, plan.grad_accum)):
        yield micro_batches


@dataclass
class Window:
    """The loss and the images since the last logged row, and the training time they took (evaluation
    and checkpoint time excluded). The loss stays on the device until a logging step reads it."""
    loss_sum: torch.Tensor
    loss_count: int
    started: float = field(default_factory=time.time)
    images: int = 0

    def add(self, result: StepResult, images: int) -> None:
        for loss in result.losses:
            self.loss_sum += loss
            self.loss_count += 1
        self.images += images

    def pause(self, since: float) -> None:
        self.started += time.time() - since


@dataclass
class Run:
    """One run's bookkeeping around the loop: the run directory, the state, the tracker and the progress
    bar; logging, evaluation, checkpoints, the diagnosis and the summary."""
    cfg: Config
    parts: Parts
    dist: Distributed
    run_dir: Path
    state: TrainState
    tracker: Tracker
    window: Window
    bar: tqdm
    compiles: RecompileWatch
    ema_eval: EmaEvalCompile
    lock: RunLock
    started: float = field(default_factory=time.time)
    first_step_s: Optional[float] = None  # this session's first step, compiling included
    last_result: Optional[StepResult] = None
    error: Optional[str] = None  # why a failed run failed, when the trainer knows

    @classmethod
    def open(cls, cfg: Config, parts: Parts, dist: Distributed, run_dir: Optional[Path], resume,
             change_batch: bool = False) -> "Run":
        run_dir, lock = claim_run_dir(cfg, run_dir, resume, dist, change_batch)  # rank 0 owns run_dir until released
        try:
            state, change = restore(parts, run_dir / "checkpoints", change_batch)
        except BaseException:
            lock.release()
            raise
        versions = code_versions() if dist.is_main else {}  # git runs once, on the rank that writes
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
            write_json_atomic(run_dir / "plan.json", parts.plan.to_dict())
            write_json_atomic(run_dir / "versions.json", versions)
        tracker = Tracker(run_dir, {**cfg.to_dict(), "versions": versions}, cfg.wandb, cfg.name, enabled=dist.is_main,
                          resume_steps_taken=state.steps_taken)
        if change is not None:  # after the tracker has dropped the rows a killed session left
            peaks = peak_lr(cfg.optim, change.before["global_batch"]), parts.schedule.peak
            log.info(change.describe(*peaks))
            tracker.log(change.row(*peaks), state.steps_taken)
        engine = parts.step.engine
        log.info(f"run {cfg.name}: {run_dir} | {parts.plan.banner()} | peak lr {parts.schedule.peak:.4g} | "
                 f"{cfg.model.name} {cfg.engine.precision} ZeRO {cfg.engine.zero_stage} on {engine.device}")
        log.info(f"validation: {parts.loaders.validation}")
        # a resumed run continues the logging window its checkpoint was in (exact metrics after resume)
        window = Window(torch.tensor(state.loss_window_sum, device=engine.device), state.loss_window_count)
        bar = tqdm(total=parts.plan.total_steps, initial=state.step, desc="train", disable=not dist.is_main,
                   dynamic_ncols=True)
        return cls(cfg, parts, dist, run_dir, state, tracker, window, bar,
                   RecompileWatch(cfg.compile.target != "off"), EmaEvalCompile(cfg.compile), lock)

    def after_step(self, result: StepResult) -> None:
        self.last_result = result
        self.window.add(result, self.parts.plan.global_batch)
        if self.first_step_s is None:  # this session's first step: it includes compiling
            self.first_step_s = time.time() - self.window.started
        self.compiles.after_step()
        self.bar.update(1)

    def corrupt_images(self) -> list[int]:
        """The images found corrupt so far on any rank, flagged on this rank too (each counted once over
        the ranks, and not reported again). A collective: every rank calls it at the same step."""
        loaders = self.parts.loaders
        found = union_over_ranks(loaders.corrupt_indices(), self.dist.cpu_group)
        loaders.mark_corrupt(found)
        return sorted(found)

    def log_train(self, result: StepResult) -> None:
        state, plan, engine, window = self.state, self.parts.plan, self.parts.step.engine, self.window
        elapsed = time.time() - window.started
        state.train_seconds += elapsed
        grad_norm, outcome = result.outcome.grad_norm, result.outcome
        row = {"step": state.step, "epoch": plan.epoch_at(state.step),
               # note: reading the loss is a device sync, done only on logging steps
               "loss": mean_over_ranks(window.loss_sum / window.loss_count),
               "lr": self.parts.schedule(state.step - 1), "images_per_s": window.images / max(elapsed, 1e-9),
               "grad_norm": None if grad_norm is None else float(grad_norm),
               # this step's: ||w_t - w_t-1|| / ||w_t|| (0 for a skipped step), and ||w_t||
               "update_ratio": float(outcome.update_norm / outcome.weight_norm), "weight_norm": float(outcome.weight_norm),
               "loss_scale": engine.loss_scale(), "overflow": not result.outcome.applied,
               "skipped_steps": engine.skipped_steps, "corrupt_images": len(self.corrupt_images()),
               **({"compiled_graphs": self.compiles.graphs(), "recompiles": self.compiles.recompiles()}
                  if self.compiles.enabled else {})}
        self.compiles.check(state.step)
        self.tracker.log(row, state.steps_taken)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}", img_s=f"{row['images_per_s']:.0f}",
                             epoch=f"{row['epoch']:.2f}")
        self.window = Window(torch.zeros((), device=engine.device), 0)

    def evaluate(self) -> bool:
        """Evaluate the model and its EMA and log them; True when checkpoint.keep_best's metric reached
        a new best."""
        paused = time.time()
        state, plan, parts = self.state, self.parts.plan, self.parts
        result = evaluate_model_and_ema(parts.step.engine, parts.step.ema.module, parts.loaders.val, self.dist.is_main,
                                        self.cfg.compile.channels_last)
        compiled_ema = self.ema_eval.consider(parts.step.ema.module, result.pop("ema_eval_seconds"),
                                              plan.evals_left(state.step), self.first_step_s or 0.0)
        self.compiles.after_eval(new_graphs_expected=compiled_ema)
        state.last_eval = {"step": state.step, "epoch": plan.epoch_at(state.step), **result}
        keep_best = self.cfg.checkpoint.keep_best
        new_best = keep_best != "none" and result[keep_best] > state.best.get(keep_best, -1.0)
        for key in METRIC_NAMES:
            state.best[key] = max(state.best.get(key, -1.0), result[key])
        self.tracker.log(state.last_eval, state.steps_taken)
        log.info(f"eval step {state.step} epoch {plan.epoch_at(state.step):.2f}: model top1 {result['top1']:.2f} "
                 f"top5 {result['top5']:.2f} | EMA top1 {result['ema_top1']:.2f} top5 {result['ema_top5']:.2f} "
                 f"({result['val_images']} images)")
        self.window.pause(paused)  # evaluation time is not training time
        return new_best

    def save_checkpoint(self, new_best: bool = False) -> None:
        paused = time.time()
        state, engine = self.state, self.parts.step.engine
        if not health.all_finite(engine.module):  # never write a checkpoint that cannot be trained from
            raise Collapsed("the weights are non-finite; the last good checkpoint is kept")
        state.skipped_steps = engine.skipped_steps
        state.loss_window_sum, state.loss_window_count = float(self.window.loss_sum), self.window.loss_count  # a sync
        state.corrupt_images = self.corrupt_images()
        client = {"trainer": state.to_dict(), "ema": self.parts.step.ema.state_dict(), "rng": checkpoint.rng_states(),
                  "config": self.cfg.to_dict(), "batch": self.parts.plan.batch_shape()}
        keep_best = self.cfg.checkpoint.keep_best
        best = {"metric": keep_best, "value": state.best[keep_best]} if new_best else None
        checkpoint.save(engine.ds, self.run_dir / "checkpoints", state.steps_taken, client, self.cfg.checkpoint.keep,
                        self.dist.is_main, best=best)
        if new_best and self.dist.is_main:
            export_weights(self.run_dir, engine.module, self.parts.step.ema.module, prefix="best_")
        self.window.pause(paused)  # checkpoint time is not training time

    def diagnose(self, collapse: Collapsed) -> None:
        """Name the first module whose output or gradient went non-finite, by replaying the offending
        batch, and write diagnosis.md/.json (rank 0)."""
        if collapse.step is not None:  # the collapsed step counts as taken (and skipped)
            self.state.steps_taken += collapse.step - self.state.step
            self.state.step = collapse.step
        if not self.dist.is_main:
            return
        engine = self.parts.step.engine
        inputs, targets = collapse.batch or self.last_result.last_batch
        scale = collapse.loss_scale or self.last_result.outcome.loss_scale or 1.0
        modules = health.first_nonfinite_modules(engine.module, inputs, targets, self.parts.step.criterion, scale)
        diagnosis = health.write_diagnosis(self.run_dir, str(collapse), self.state.step, modules, engine.monitor,
                                           self.cfg.engine.precision, engine.weight_names)
        culprit = diagnosis["first_nonfinite_forward"] or diagnosis["first_nonfinite_gradient"]
        log.error(f"collapsed at step {self.state.step}: {collapse}; first non-finite: "
                  f"{culprit['module'] if culprit else 'none found'}; see {self.run_dir / 'diagnosis.md'}")

    def close(self, status: str, stopped_by: Optional[str]) -> dict:
        """Write the summary and finish the tracker, whatever ended the run."""
        self.bar.close()
        if status == "interrupted":
            log.info(f"{stopped_by}: checkpoint written at step {self.state.step}; resume with --resume")
        if status == "completed" and self.dist.is_main:
            export_weights(self.run_dir, self.parts.step.engine.module, self.parts.step.ema.module)
        result = self.summary(status)
        try:
            self.tracker.summary(result)
            self.tracker.finish(exit_code=0 if status in ("completed", "interrupted") else 1)
        except OSError as err:  # a full disk may leave no room even for the summary: say so
            log.error(f"error: {self.run_dir / 'summary.json'} not written ({err.strerror or err})")
        finally:
            self.lock.release()
        if status != "failed":
            barrier()  # all ranks end together
        return result

    def summary(self, status: str) -> dict:
        state, plan, engine = self.state, self.parts.plan, self.parts.step.engine
        state.skipped_steps = engine.skipped_steps
        # every rank ends a completed or interrupted run at the same step; after a failure, this rank's view
        agreed = status in ("completed", "interrupted")
        corrupt = self.corrupt_images() if agreed else self.parts.loaders.corrupt_indices()
        return {"status": status, **({"error": self.error} if self.error else {}), "skipped_steps": state.skipped_steps, "corrupt_images": len(corrupt),
                "run_dir": str(self.run_dir), "validation": self.parts.loaders.validation,
                "steps": state.step, "total_steps": plan.total_steps,
                "epochs": plan.epoch_at(state.step), "images_seen": state.images_seen,
                "images_per_s": state.images_seen / max(state.train_seconds, 1e-9),
                "wall_time_s": time.time() - self.started, "final": state.last_eval, "best": state.best,
                "first_step_s": self.first_step_s, "compiled_graphs": self.compiles.graphs(),
                "recompiles": self.compiles.recompiles(),
                **{k: state.last_eval.get(k) for k in METRIC_NAMES},
                **{f"best_{k}": state.best.get(k) for k in METRIC_NAMES}}


def restore(parts: Parts, ckpt_dir: Path, change_batch: bool = False) -> tuple[TrainState, Optional[BatchChange]]:
    """The state of the newest complete checkpoint, loaded into the engine, the EMA and the RNGs; a fresh
    state when there is none (claim_run_dir has refused a directory that must not be resumed). With
    change_batch, a checkpoint of another batch is moved to this plan's (and what moved is returned)."""
    engine = parts.step.engine
    found = checkpoint.load_newest_intact(engine.ds, ckpt_dir)  # verified; a damaged one is skipped, and said
    if found is None:
        if (ckpt_dir.parent / "config.yaml").exists():
            log.info(f"{ckpt_dir.parent} holds no checkpoint yet: the run starts again from step 0")
        return TrainState(), None
    tag, client = found
    if not change_batch:
        check_same_batch(client.get("batch"), parts.plan)
    state = TrainState(**client["trainer"])
    engine.monitor.skipped_steps = state.skipped_steps
    parts.loaders.mark_corrupt(state.corrupt_images)  # counted on, not reported again
    parts.step.ema.load_state_dict(client["ema"])
    checkpoint.restore_rng_states(client["rng"])
    log.info(f"resuming from {ckpt_dir / tag} (step {state.step})")
    if change_batch:
        return rebatch(state, client.get("batch"), parts.plan)
    return state, None
