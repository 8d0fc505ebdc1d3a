"""The trainer's own position in the run, checkpointed with the weights like any other component."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class TrainState:
    step: int = 0  # the lr schedule's clock: optimizer steps taken, or as many global batches of images
    # every optimizer step this run took, all sessions: equal to `step` unless a resume changed the batch
    # (--change-batch moves `step` to the images seen / the new global batch, possibly back); it never goes
    # back, so it names the checkpoints and is W&B's step. None: not given (= step)
    steps_taken: Optional[int] = None
    epoch: int = 0
    batches_in_epoch: int = 0  # micro batches of `epoch` already consumed on this rank
    images_seen: int = 0  # global, all ranks
    skipped_steps: int = 0  # optimizer steps skipped for overflow / non-finite gradients
    train_seconds: float = 0.0  # wall time spent in training steps, all sessions
    # micro-batch losses since the last logged row: a resumed run's first row averages the same window
    loss_window_sum: float = 0.0
    loss_window_count: int = 0
    last_eval: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    corrupt_images: list[int] = field(default_factory=list)  # source indices found not to decode, all ranks

    def __post_init__(self):
        if self.steps_taken is None:  # a fresh state, or a checkpoint written before the counter existed
            self.steps_taken = self.step

    def count_step(self, micro_batches: int, global_batch: int) -> None:
        self.step += 1
        self.steps_taken += 1
        self.batches_in_epoch += micro_batches
        self.images_seen += global_batch

    def next_epoch(self) -> None:
        self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def to_dict(self) -> dict:
        return asdict(self)
