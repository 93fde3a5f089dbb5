"""The recovery policy: what is known of a loss goes in, a decision comes out (go on, or stop
and why). Pure: no group, no Ray; recovery.py carries its decisions out (as Ray Train V2's
failure policy decides and its controller acts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import NonFiniteError, PeerError

# A replica ended as hung this many times in one run is not replaced again: a slow node's
# replacement lands where it was, and would time out again.
MAX_HANGS = 3


@dataclass(frozen=True)
class Failure:
    """What the driver knows of a loss when it decides."""

    lost: str
    """The loss, in words (the ReplicaLost's message)."""
    replicas: list[str]
    """The replicas found gone (dead, or hung and killed, or ended after raising), by name."""
    attempt: int
    """0 for the first try at recovering from this loss; each further loss during recovery adds 1."""
    survivors: int
    step: Optional[int]
    """The step to redo: the most advanced survivor's (None without survivors)."""
    previous: Optional[dict]
    """The run's last restart record (replica_lost event), if any."""
    raised: Optional[str] = None
    """The error a replica raised, where it was ended to retry its step (on_error 'retry')."""
    hung: tuple[str, ...] = ()
    """Of `replicas`, those ended as hung (step_timeout) this time."""
    hangs_before: dict[str, int] = field(default_factory=dict)
    """Times each replica was ended as hung earlier in the run, by name."""


@dataclass(frozen=True)
class Decision:
    recover: bool
    reason: str = ""
    """Why the run stops, where it does."""
    capped: tuple[str, ...] = ()
    """Replicas not to replace: they timed out max_hangs times (the run goes on without them)."""


@dataclass(frozen=True)
class RecoveryPolicy:
    """When a run goes on after losing replicas, and when it stops."""

    min_workers: int = 1
    max_attempts: int = 3
    """Tries at one recovery: each new loss while recovering starts it over."""
    on_error: str = "retry"
    """A replica that raises: 'retry' its step once from the survivors' state, or 'stop'."""
    max_hangs: int = MAX_HANGS
    """Times one replica may be ended as hung before it is no longer replaced."""
    sharded: bool = False
    """shard 'full': each replica holds the only copy of its shard, so no survivor holds the state to
    go on from; a loss stops the run (to resume from its last checkpoint)."""

    def retries(self, error: Exception, workers: int) -> bool:
        """Whether a replica's error is retried: on_error 'retry', the replica known, another
        replica to take the state from. (A non-finite loss has its own policy, on_nonfinite.)"""
        if isinstance(error, (NonFiniteError, PeerError)) or self.sharded:
            return False
        return self.on_error == "retry" and getattr(error, "rank", None) is not None and workers > 1

    def decide(self, failure: Failure) -> Decision:
        if self.sharded:
            return Decision(False, f"{failure.lost}: with shard 'full' each replica holds the only copy of its shard "
                                   f"of the parameters and optimizer state, lost with it (two copies of each "
                                   f"shard are not built yet)")
        if failure.attempt >= self.max_attempts:
            return Decision(False, f"replicas kept failing while recovering ({failure.lost})")
        previous = failure.previous
        same_step = previous is not None and previous["step"] == failure.step
        if failure.raised is not None:
            if failure.survivors == 0:
                return Decision(False, f"{failure.raised} (no other replica was left to retry from)")
            if same_step and previous.get("cause") == "error":  # wherever the split put the failing samples
                return Decision(False, f"{failure.raised}; step {failure.step} failed again after a retry")
        if failure.survivors == 0:
            return Decision(False, f"every replica was lost ({failure.lost})")
        if same_step and previous["replicas"] == failure.replicas:
            return Decision(False, f"{failure.lost} again at step {failure.step}, as before its replacement: "
                                   f"that step itself kills it")
        capped = tuple(name for name in failure.hung if failure.hangs_before.get(name, 0) + 1 >= self.max_hangs)
        return Decision(True, capped=capped)

    def after_replacement(self, workers: int) -> Decision:
        """Whether the replicas left (survivors and replacements) are enough to go on."""
        if workers < self.min_workers:
            return Decision(False, f"{workers} replica{'s' * (workers != 1)} left, fewer than "
                                   f"min_workers={self.min_workers}")
        return Decision(True)
