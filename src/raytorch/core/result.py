"""TrainResult: what a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class TrainResult:
    """What fit() returns."""

    epoch_losses: list[float]
    """Mean train loss of each epoch, sample-weighted, computed before each step's update."""
    eval_losses: list[float]
    """Eval loss after each epoch (empty without an eval set)."""
    model: nn.Module
    """The trained model, on CPU."""
    steps: int
    samples: int
    wall_time_s: float
    replica_digests: list[str] = field(default_factory=list)
    """SHA-256 of each replica's parameters at the end: all equal, or the replicas diverged."""
    epoch_times_s: list[float] = field(default_factory=list)
    """Wall time of each epoch's steps (without its evaluation)."""
    time_to_first_step_s: float = 0.0
    """From the call to fit() to the first step's losses back in the driver."""
    replica_memory: list[dict] = field(default_factory=list)
    """Per replica at the end: bytes of params, grad, optimizer state, wire buffers, and its
    proportional set size above the process's PyTorch baseline."""
    restarts: list[dict] = field(default_factory=list)
    """Each loss of replicas: step, replicas, cause, replaced, dropped, seconds to the next step."""
    skipped_steps: list[int] = field(default_factory=list)
    """Steps whose update was skipped for a non-finite loss or gradient (on_nonfinite 'skip')."""
    resumed_from: Optional[int] = None
    """The global step of the checkpoint this run resumed from, if any."""
    eval_accuracies: list[float] = field(default_factory=list)
    """For a classifier: the fraction of the eval set classified right after each epoch."""
    replica_samples: dict[str, int] = field(default_factory=dict)
    """Training samples each replica computed on in this run (replica-<rank>: count): the split."""
    steps_redone: int = 0
    """Steps whose gradient a replica computed again after a loss (the interrupted step, whose
    gradient was computed but not applied), counted by the replicas: 0 without losses."""
    profile: dict[str, dict] = field(default_factory=dict)
    """With profile_steps, per replica (replica-<rank>): the profiled steps it ran ("steps"), its mean
    milliseconds per step of each phase ("ms": fetch, forward_backward, allreduce, optimizer), and
    its trace's path ("trace"; None where no profiled step ran on it)."""

    @property
    def eval_loss(self) -> Optional[float]:
        return self.eval_losses[-1] if self.eval_losses else None
