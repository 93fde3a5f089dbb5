"""Position: where a run stands and what it has measured so far. Pure: no Ray."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class Position:
    """`index` steps of epoch `epoch` done, and what was measured so far."""

    epoch: int = 0
    index: int = 0
    losses: list[float] = field(default_factory=list)  # per step of the current epoch
    counts: list[int] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    eval_accuracies: list[float] = field(default_factory=list)
    restarts: list[dict] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    best: Optional[float] = None  # early stopping: the best eval metric so far (lower is better)
    since_best: int = 0  # evaluations since it
    stopped: bool = False  # early-stopped: the run ends at `index` of `epoch`
    loss_sum: float = 0.0  # over the epoch's finite steps: sum of loss * samples, and the samples
    loss_samples: int = 0

    def add(self, loss: float, samples: int) -> None:
        self.losses.append(loss)
        self.counts.append(samples)
        if math.isfinite(loss):
            self.loss_sum += loss * samples
            self.loss_samples += samples

    def trim(self, steps: int) -> None:
        """Keep the epoch's first `steps` losses."""
        losses, counts = self.losses[:steps], self.counts[:steps]
        self.losses, self.counts, self.loss_sum, self.loss_samples = [], [], 0.0, 0
        for loss, samples in zip(losses, counts):
            self.add(loss, samples)

    def next_epoch(self) -> None:
        self.epoch, self.index = self.epoch + 1, 0
        self.trim(0)

    def running_loss(self) -> Optional[float]:
        """The epoch's sample-weighted mean loss so far, non-finite (skipped) steps left out."""
        return self.loss_sum / self.loss_samples if self.loss_samples else None

    def judge(self, value: float, patience: int) -> bool:
        """Early stopping: count evaluations in which `value` (lower is better) did not improve on
        the best; True (and stopped) once `patience` have gone by."""
        if self.best is None or value < self.best:
            self.best, self.since_best = value, 0
            return False
        self.since_best += 1
        self.stopped = self.since_best >= patience
        return self.stopped

    def checkpoint(self, index: int) -> dict[str, Any]:
        """What a checkpoint keeps of this position, with `index` steps of the epoch done."""
        return {
            "epoch": self.epoch, "index": index,
            "losses": torch.tensor(self.losses[:index], dtype=torch.float64),
            "counts": torch.tensor(self.counts[:index], dtype=torch.int64),
            "epoch_losses": list(self.epoch_losses), "eval_losses": list(self.eval_losses),
            "eval_accuracies": list(self.eval_accuracies), "best": self.best, "since_best": self.since_best,
            "restarts": json.dumps(self.restarts), "skipped": list(self.skipped),
        }

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "Position":
        at = cls(epoch=saved["epoch"], index=saved["index"], epoch_losses=list(saved["epoch_losses"]),
                 eval_losses=list(saved["eval_losses"]), eval_accuracies=list(saved.get("eval_accuracies", [])),
                 best=saved.get("best"), since_best=saved.get("since_best", 0),
                 restarts=json.loads(saved["restarts"]), skipped=list(saved["skipped"]))
        for loss, samples in zip(saved["losses"].tolist(), saved["counts"].tolist()):
            at.add(loss, samples)
        return at
