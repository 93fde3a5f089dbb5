"""The recovery policy: what is known of a loss goes in, a decision comes out (go on, or stop
and why). Pure: no group, no Ray; recovery.py carries its decisions out (as Ray Train V2's
failure policy decides and its controller acts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Failure:
    """What the driver knows of a loss when it decides."""

    lost: str
    """The loss, in words (the ReplicaLost's message)."""
    replicas: list[str]
    """The replicas found gone (dead, or hung and killed), by name."""
    attempt: int
    """0 for the first try at recovering from this loss; each further loss during recovery adds 1."""
    survivors: int
    step: Optional[int]
    """The step to redo: the most advanced survivor's (None without survivors)."""
    previous: Optional[dict]
    """The run's last restart record (replica_lost event), if any."""


@dataclass(frozen=True)
class Decision:
    recover: bool
    reason: str = ""
    """Why the run stops, where it does."""


@dataclass(frozen=True)
class RecoveryPolicy:
    """When a run goes on after losing replicas, and when it stops."""

    min_workers: int = 1
    max_attempts: int = 3
    """Tries at one recovery: each new loss while recovering starts it over."""

    def decide(self, failure: Failure) -> Decision:
        if failure.attempt >= self.max_attempts:
            return Decision(False, f"replicas kept failing while recovering ({failure.lost})")
        if failure.survivors == 0:
            return Decision(False, f"every replica was lost ({failure.lost})")
        previous = failure.previous
        if previous is not None and previous["step"] == failure.step and previous["replicas"] == failure.replicas:
            return Decision(False, f"{failure.lost} again at step {failure.step}, as before its replacement: "
                                   f"that step itself kills it")
        return Decision(True)

    def after_replacement(self, workers: int) -> Decision:
        """Whether the replicas left (survivors and replacements) are enough to go on."""
        if workers < self.min_workers:
            return Decision(False, f"{workers} replicas left, fewer than min_workers={self.min_workers}")
        return Decision(True)
