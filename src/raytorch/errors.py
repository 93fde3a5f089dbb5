"""raytorch's own exceptions: what a user can cause, said in words that tell what to change."""

from __future__ import annotations


class RaytorchError(Exception):
    """Base of every error raytorch raises on purpose."""


class ConfigError(RaytorchError, ValueError):
    """A configuration value is invalid; the message names the field and what to do."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")

    def __reduce__(self):
        return type(self), (self.field, str(self).split(": ", 1)[1])


class ClusterError(RaytorchError):
    """Ray cannot be reached, or the cluster cannot hold what the run asks for."""


class ReplicaError(RaytorchError):
    """A replica failed while training; the message names the replica and the step, and so do
    `rank` and `step` (None where not known: a failure of several, or before any step). Picklable
    with its fields: it crosses from a replica's process to the driver."""

    def __init__(self, message: str, *, rank: int | None = None, step: int | None = None):
        super().__init__(message)
        self.rank, self.step = rank, step


class ReplicaLost(ReplicaError):
    """A replica died or hung: the driver replaces it and redoes the interrupted step. `ranks`:
    the lost replicas where known (else the driver asks every replica)."""

    def __init__(self, message: str, ranks: list[int] | None = None, **where: int | None):
        super().__init__(message, **where)
        self.ranks = ranks


class PeerError(ReplicaError):
    """A replica stopped because a peer it waited for failed: a consequence, not the cause."""


class NonFiniteError(ReplicaError):
    """A step's loss or gradient was NaN or infinite; the message names the step and the replica."""


class CheckpointError(RaytorchError):
    """A checkpoint cannot be read or written or does not belong to this run, or the run directory
    cannot be written; the message says which and why, and where the run can resume from."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT or SIGTERM); `checkpoint` is where it can resume from
    (None where no checkpoint was written), `step` the global step it stopped before."""

    def __init__(self, signum: int, checkpoint: str | None = None, step: int | None = None):
        super().__init__(signum, checkpoint, step)
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
