"""The run's arithmetic, computed once: world size, micro batch and accumulation, the global batch,
the epoch in optimizer steps, the schedule's clock, the total length and the logging, evaluation and
checkpoint cadence. The DeepSpeed config, the lr schedule, the loop and the banner all read it; it is
saved in the run directory (plan.json) and in every checkpoint.

    global batch = world size x micro batch x accumulation

A global batch that the ranks' micro batches do not divide is refused, never rounded."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

from .config import CheckpointConfig, ConfigError, TrainConfig
from .state import TrainState


def grad_accum_for(train: TrainConfig, world_size: int) -> int:
    """Accumulation steps: stated (train.grad_accum), or derived from train.global_batch."""
    if train.global_batch is None:
        return train.grad_accum
    per_step = world_size * train.micro_batch
    if train.global_batch % per_step:
        raise ConfigError(f"train.global_batch={train.global_batch} is not a multiple of world size {world_size} "
                          f"x train.micro_batch {train.micro_batch} = {per_step}")
    return train.global_batch // per_step


def steps_for(epochs: float, steps_per_epoch: float, key: str) -> float:
    """A length in epochs as optimizer steps (a float); a setting so large that the count overflows
    (train.epochs=1e308) is refused here, not by the int() of infinity later."""
    steps = epochs * steps_per_epoch
    if not math.isfinite(steps):
        raise ConfigError(f"{key}={epochs:g} is more optimizer steps than can be counted "
                          f"({steps_per_epoch:.4g} per epoch)")
    return steps


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    micro_batch: int  # per process, per forward
    grad_accum: int
    global_batch: int
    train_images: int  # the training split
    micro_batches_per_epoch: int  # per rank, as the loader hands them out (the last partial one dropped)
    steps_per_epoch: int  # optimizer steps the loader gives in one pass (left-over micro batches dropped)
    # TF's count, train images / global batch, a fraction: an epoch of the lr schedule, of the logged
    # `epoch` and of the cadence, whatever the loader drops (TF repeats its data set and counts steps)
    tf_steps_per_epoch: float
    schedule_epoch: float  # optimizer steps in one epoch of the lr schedule (train.epoch_scale x TF's epoch)
    warmup_steps: int
    total_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def build(cls, train: TrainConfig, checkpoint: CheckpointConfig, warmup_epochs: float, world_size: int,
              train_images: int, micro_batches_per_epoch: int) -> "RunPlan":
        grad_accum = grad_accum_for(train, world_size)
        global_batch = world_size * train.micro_batch * grad_accum
        steps_per_epoch = micro_batches_per_epoch // grad_accum
        if steps_per_epoch == 0:
            # name the setting that made the batch too large: the stated global batch, or the accumulation
            knob = ("train.global_batch" if train.global_batch is not None else
                    "train.grad_accum (or train.micro_batch)" if grad_accum > 1 else "train.micro_batch")
            raise ConfigError(f"data: {train_images} training images are fewer than one global batch "
                              f"({global_batch} = world size {world_size} x train.micro_batch {train.micro_batch} "
                              f"x accumulation {grad_accum}); lower {knob}")
        tf_epoch = train_images / global_batch
        schedule_epoch = steps_for(train.epoch_scale, tf_epoch, "train.epoch_scale")
        return cls(
            world_size=world_size, micro_batch=train.micro_batch, grad_accum=grad_accum, global_batch=global_batch,
            train_images=train_images, micro_batches_per_epoch=micro_batches_per_epoch,
            steps_per_epoch=steps_per_epoch, tf_steps_per_epoch=tf_epoch, schedule_epoch=schedule_epoch,
            warmup_steps=int(steps_for(warmup_epochs, schedule_epoch, "schedule.warmup_epochs")),  # TF truncates too
            # TF truncates: 350 epochs of 1,281,167 images at 2048 are its 218,949 steps
            total_steps=min(train.max_steps or math.inf,
                            max(1, int(steps_for(train.epochs, schedule_epoch, "train.epochs")))),
            log_every=train.log_every_steps,
            eval_every=max(1, round(steps_for(train.eval_every_epochs, tf_epoch, "train.eval_every_epochs"))),
            checkpoint_every=max(1, round(steps_for(checkpoint.every_epochs, tf_epoch, "checkpoint.every_epochs"))))

    def epoch_at(self, step: int) -> float:
        """Epochs of training images seen after `step` optimizer steps (TF's count)."""
        return step / self.tf_steps_per_epoch

    def is_last(self, step: int) -> bool:
        return step >= self.total_steps

    def logs_at(self, step: int) -> bool:
        return step % self.log_every == 0 or self.is_last(step)

    def evaluates_at(self, step: int) -> bool:
        return step % self.eval_every == 0 or self.is_last(step)

    def checkpoints_at(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or self.is_last(step)

    def evals_left(self, step: int) -> int:
        return math.ceil((self.total_steps - step) / self.eval_every)

    def batch_shape(self) -> dict:
        """What a checkpoint must agree on to be resumed: the numbers the lr and the data order follow."""
        return {"world_size": self.world_size, "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                "global_batch": self.global_batch}

    def banner(self) -> str:
        return (f"world {self.world_size} x micro batch {self.micro_batch} x accum {self.grad_accum} = global batch "
                f"{self.global_batch} | {self.train_images} train images, {self.tf_steps_per_epoch:.2f} steps/epoch "
                f"({self.steps_per_epoch} per pass of the loader), {self.warmup_steps} warmup, {self.total_steps} steps")

    def to_dict(self) -> dict:
        return asdict(self)


def check_same_batch(saved: Optional[dict], plan: RunPlan) -> None:
    """A checkpoint continues only with the batch it was trained with: another global batch changes the
    lr mid-run, and another split of the same batch over ranks and micro batches puts the data position
    (samples consumed per rank) somewhere else; neither may happen without a word."""
    if saved is None:  # a checkpoint of a trainer that did not record it
        return
    here = plan.batch_shape()
    differences = [f"{key} {saved.get(key)} there, {here[key]} here" for key in here if saved.get(key) != here[key]]
    if differences:
        raise ConfigError(f"the checkpoint was trained with another batch ({'; '.join(differences)}); resume with "
                          f"the same world size, train.micro_batch and accumulation, or pass --change-batch")


def describe_batch(shape: dict) -> str:
    return (f"world {shape['world_size']} x micro batch {shape['micro_batch']} x accum {shape['grad_accum']} = "
            f"global batch {shape['global_batch']}")


@dataclass(frozen=True)
class BatchChange:
    """What `rebatch` moved, for the log line and the metrics.jsonl event row."""
    before: dict  # the checkpoint's batch_shape()
    after: dict  # this run's
    step_before: int
    step_after: int
    images_seen: int
    epoch: int  # the data epoch the position is in
    image_before: int  # images of the epoch's order consumed, all ranks (n)
    image_after: int  # where this run resumes in that order (n' <= n)

    def row(self, peak_lr_before: float, peak_lr_after: float) -> dict:
        """The metrics.jsonl row: no `loss` nor `top1`, so readers of training or evaluation rows skip it."""
        return {"step": self.step_after, "event": "batch_change",
                **{f"{key}_before": value for key, value in self.before.items()},
                **{f"{key}_after": value for key, value in self.after.items()},
                "step_before": self.step_before, "images_seen": self.images_seen,
                "peak_lr_before": peak_lr_before, "peak_lr_after": peak_lr_after, "data_epoch": self.epoch,
                "image_before": self.image_before, "image_after": self.image_after,
                "images_repeated": self.image_before - self.image_after}

    def describe(self, peak_lr_before: float, peak_lr_after: float) -> str:
        repeated = self.image_before - self.image_after
        data = (f"epoch {self.epoch} resumes at image {self.image_after} of its order, " +
                (f"not {self.image_before} ({repeated} images seen twice)" if repeated else "no image seen twice"))
        return (f"batch changed (--change-batch): {describe_batch(self.before)} -> {describe_batch(self.after)} | "
                f"step {self.step_before} -> {self.step_after} ({self.images_seen} images seen) | peak lr "
                f"{peak_lr_before:.4g} -> {peak_lr_after:.4g} | {data}")


def rebatch(state: TrainState, saved: Optional[dict], plan: RunPlan) -> tuple[TrainState, Optional[BatchChange]]:
    """The checkpoint's state moved to this plan's batch (--change-batch); (state, None) when the batch
    is the checkpoint's own.

    The schedule continues at the same point measured in images, TF's clock (an epoch of the schedule
    is train images / global batch): step = round(images seen / new global batch), Python's round (a
    tie goes to the even step). The total, warmup, lr and cadence are the new plan's, as for any run.

    The data continues where the epoch's order was left, to the micro batch: DistributedSampler
    (drop_last=True: no padding) deals the epoch's permutation of all train images, the same
    whatever the world size, to the ranks in turn, so `batches_in_epoch` micro batches per rank are
    exactly its first n = batches_in_epoch x micro batch x world size images. This run starts at
    n' = the largest multiple of its micro batch x world size <= n: images n'..n-1 are seen twice.
    n' need not be a multiple of the new global batch: the loop then ends the epoch at the last whole
    accumulation (loop.steps_of_epoch), dropping what is left as it drops any epoch's remainder."""
    here = plan.batch_shape()
    if saved is None:
        raise ConfigError("--change-batch: the checkpoint does not record its batch (an older trainer wrote it); "
                          "its data position cannot be recomputed")
    if saved == here:
        return state, None
    step = round(state.images_seen / plan.global_batch)
    if plan.is_last(step):
        raise ConfigError(f"--change-batch: {state.images_seen} images seen are step {step} at global batch "
                          f"{plan.global_batch}, at or past this plan's last step {plan.total_steps}: nothing to train")
    consumed = state.batches_in_epoch * saved["micro_batch"] * saved["world_size"]
    per_batch = plan.micro_batch * plan.world_size  # images per micro batch, all ranks
    batches = consumed // per_batch
    change = BatchChange(saved, here, state.step, step, state.images_seen, state.epoch, consumed, batches * per_batch)
    return replace(state, step=step, batches_in_epoch=batches), change
