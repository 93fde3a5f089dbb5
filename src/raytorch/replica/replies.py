"""What a replica answers the driver's calls besides gradients: typed records, the same on both
sides of the call (the group and the driver read them; nothing is a dict keyed by strings)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional


@dataclass(frozen=True)
class ReplicaInfo:
    """Where a replica runs and what its /dev/shm can hold: answered once it is fully built."""

    rank: int
    """Its rank: it is replica-<rank> for good (a spare takes the rank of the one it replaces)."""
    pid: int
    device: str
    """Where it computes: 'cpu', 'cuda:0', ..."""
    node_id: Optional[str]
    """The Ray node it runs on (None outside Ray)."""
    shared_memory: bool
    """Whether the shared-memory wire can run where it runs (wire.choice.shared_memory_available)."""
    shm_free: int
    """Free bytes in its /dev/shm."""
    grad_bytes: int
    """Bytes of its flat gradient."""
    shared_buffers: int
    """Model-sized buffers a sharded update would map past two replicas (0: its update is not sharded)."""

    def as_rank(self, rank: int) -> ReplicaInfo:
        """The same replica under another rank (a spare taking a lost replica's place)."""
        return dataclasses.replace(self, rank=rank)

    def described(self, wire: str) -> dict:
        """What the console and the run's records say of it: its fields and the wire it is on."""
        return {**dataclasses.asdict(self), "wire": wire}


class Liveness(NamedTuple):
    """A replica's answer to a ping (from its health thread, while a step may run)."""

    steps: int
    """Updates applied."""
    computing_s: Optional[float]
    """How long the step now computing has computed (None: none is)."""
    redone: int
    """Steps it computed a second time (after a peer was lost)."""


class Score(NamedTuple):
    """A replica's evaluation of its part of the eval set (None, None: it had no sample)."""

    loss: Optional[float]
    """Mean loss over its samples."""
    accuracy: Optional[float]
    """Fraction classified right, for a classifier (outputs (n, classes) against integer labels)."""


class StepSeconds(NamedTuple):
    """A replica's own time on one step: the driver's measure of its speed (waits for peers left out)."""

    compute: float
    """Forward and backward: grows with the replica's samples."""
    other: float
    """The rest of its own work (applying the all-reduce, the optimizer step, publishing its gradient)."""


class RunReport(NamedTuple):
    """What Replica.run returns besides its gradient: per step of the call, the local mean loss
    (None where this replica had no sample) and the seconds it took."""

    losses: list[Optional[float]]
    seconds: list[StepSeconds]
    unplaced: tuple[str, ...] = ()
    """Random calls its forwards made that are not placed per sample (core/seeded_forward.py), each
    reported once."""
