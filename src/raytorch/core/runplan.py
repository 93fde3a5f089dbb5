"""RunPlan: the run's arithmetic over epochs and steps, fixed at start. Pure: no Ray.

Beside sharding.py (which samples form each global batch): how many steps an epoch and the run
hold, which batches an epoch runs, and how many samples lie behind a point of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.schema import TrainConfig
from ..errors import ConfigError
from .sharding import epoch_order, global_batches, steps_per_epoch


@dataclass(frozen=True)
class RunPlan:
    train_size: int
    step_batch: int
    """Samples per optimizer step (batch_size x accumulate)."""
    steps_per_epoch: int
    total_steps: int
    """Steps in the run: every epoch's, or max_steps where that is fewer."""
    seed: int
    shuffle: bool
    drop_last: bool

    @classmethod
    def of(cls, config: TrainConfig, train_size: int, stream: bool = False) -> "RunPlan":
        """The plan of `config` over a training set of `train_size` samples (a stream's, read in its
        order: no shuffle); a ConfigError where no step would run."""
        steps = steps_per_epoch(train_size, config.step_batch, config.drop_last)
        if steps == 0:
            raise ConfigError("batch_size", f"{config.step_batch} samples per step exceed the {train_size} "
                                            f"training samples with drop_last: no step would run; lower batch_size "
                                            f"(or accumulate)")
        last = train_size % config.step_batch
        if config.sync_batchnorm and last and not config.drop_last and last < config.workers:
            raise ConfigError("sync_batchnorm", f"every replica must compute in every step, but each epoch's last "
                                                f"batch has {last} samples for {config.workers} replicas: set "
                                                f"drop_last, or a batch_size that leaves at least {config.workers}")
        total = min(steps * config.epochs, config.max_steps or steps * config.epochs)
        return cls(train_size=train_size, step_batch=config.step_batch, steps_per_epoch=steps, total_steps=total,
                   seed=config.seed, shuffle=config.shuffle and not stream, drop_last=config.drop_last)

    @property
    def epochs(self) -> int:
        """Epochs the run enters: the last may be cut short by max_steps."""
        return -(-self.total_steps // self.steps_per_epoch)

    def first_step(self, epoch: int) -> int:
        """The global step that starts `epoch`."""
        return epoch * self.steps_per_epoch

    def batches_of(self, epoch: int) -> list[torch.Tensor]:
        """The global batches `epoch` runs (sample indices), in order."""
        order = epoch_order(self.train_size, self.seed, epoch, self.shuffle)
        return global_batches(order, self.step_batch, self.drop_last)[:self.total_steps - self.first_step(epoch)]

    def samples_through(self, epoch: int) -> int:
        """Samples in epochs 0..epoch: whole epochs, then a cut one's full batches (0 for epoch -1)."""
        whole = min(epoch + 1, self.total_steps // self.steps_per_epoch)
        cut = self.total_steps - whole * self.steps_per_epoch if epoch + 1 > whole else 0
        per_epoch = self.steps_per_epoch * self.step_batch if self.drop_last else self.train_size
        return whole * per_epoch + cut * self.step_batch
