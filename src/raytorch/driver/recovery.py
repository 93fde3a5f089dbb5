"""Recovery from lost replicas: the mechanism that carries out the policy's decisions (policy.py).

Recovery finds the lost replicas through the group, asks the policy, replaces them, loads every
replica with the most advanced survivor's state and sets the run's position to the step to redo;
`until_settled` does the same for a group that is starting or restoring (the state comes from the
driver there: nothing to redo). The group reports losses and does what it is asked; the decisions
are taken here, in the driver. No Ray here.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from ..core.naming import replica_name
from ..core.position import Position
from ..errors import ReplicaError, ReplicaLost
from .policy import Failure, RecoveryPolicy

if TYPE_CHECKING:  # the mechanism's collaborators: the policy needs none of them
    from ..config.schema import TrainConfig
    from ..core.runplan import RunPlan
    from ..core.snapshot import Snapshot
    from ..group.group import ReplicaGroup
    from ..group.records import Replacement
    from ..output.sink import RunOutput
    from .pipeline import StepPipeline


class Retried(ReplicaLost):
    """A replica raised, and was ended so that its step runs again from the survivors' state
    (on_error 'retry'): recovered as a loss of that replica."""

    def __init__(self, error: ReplicaError):
        super().__init__(f"{error}: retrying the step from the other replicas' state (on_error retry)",
                         ranks=[error.rank], rank=error.rank, step=error.step)
        self.error = error


class Replaced(NamedTuple):
    """What recovery's replacement did: who was lost, the step to redo, how they were replaced,
    the state restored, and the Python stacks of those ended as hung (by name)."""

    names: list[str]
    step: int
    replacement: Replacement
    snapshot: Snapshot
    stacks: dict[str, Optional[str]]
    capped: list[str]
    """Those not replaced: ended as hung max_hangs times."""


def loss_record(lost: ReplicaLost, names: list[str], step: Optional[int], replacement: Replacement, workers: int,
                detected_at: float, **extra) -> dict:
    """The replica_lost event of a loss: when found, the step to redo, who, why (the error Ray
    gave, 'hang' for a replica killed as hung, 'error' for one ended to retry after raising), what
    replaced them, the replicas left."""
    cause = lost.__cause__
    kind = type(cause).__name__ if cause is not None and not isinstance(cause, ReplicaError) else "hang"
    if isinstance(lost, Retried):
        kind, extra = "error", {**extra, "error": str(lost.error)}
    return {"event": "replica_lost", **extra, "detected_at": detected_at, "step": step, "replicas": names,
            "cause": kind, "replaced": [replica_name(r) for r in replacement.replaced],
            "dropped": [replica_name(r) for r in replacement.dropped], "spares_used": replacement.spares_used,
            "workers": workers}


def until_settled(action: Callable[[], Any], group: ReplicaGroup, policy: RecoveryPolicy, phase: str) -> list[dict]:
    """Run `action` (the group's start, or a resume's restore) to its end: a replica lost meanwhile
    is replaced (or dropped, at min_workers or above) and the action runs again, until the policy
    gives up. Nothing is redone and nothing lost: the state the action loads is the driver's.
    Returns a record of each loss."""
    records: list[dict] = []
    while True:
        try:
            action()
            return records
        except ReplicaLost as lost:
            gone = lost.ranks if lost.ranks is not None else group.dead()
            names = [replica_name(rank) for rank in gone]
            # the state comes from the driver: no replica's loss loses it, so survivors are not needed
            decision = policy.decide(Failure(str(lost), names, len(records), group.size, None, None))
            if not decision.recover:
                raise ReplicaError(f"{decision.reason} while {phase}") from lost
            replacement = group.replace(gone)
            enough = policy.after_replacement(group.size)
            if not enough.recover:
                raise ReplicaError(f"{enough.reason} while {phase}") from lost
            records.append(loss_record(lost, names, None, replacement, group.size, time.time(), phase=phase))


class Recovery:
    """Carries out recovery: replace (or drop) the lost replicas, restore, set the position."""

    def __init__(self, config: TrainConfig, group: ReplicaGroup, pipeline: StepPipeline, output: RunOutput,
                 plan: RunPlan, policy: RecoveryPolicy, checkpoint: Callable[[], Optional[object]],
                 kept: Callable[[], str]):
        self.config, self.group, self.pipeline, self.output, self.plan = config, group, pipeline, output, plan
        self.policy, self.checkpoint, self.kept = policy, checkpoint, kept

    def after(self, failed: ReplicaError, at: Position, batches: list) -> None:
        """Recover from a loss; or from a replica's exception, where the policy retries it
        (on_error 'retry'): that replica is ended and recovered from as a loss. Else the error
        stops the run."""
        if isinstance(failed, ReplicaLost):
            return self.recover(failed, at, batches)
        if not self.policy.retries(failed, self.group.size):
            raise failed
        self.group.end([failed.rank])
        self.recover(Retried(failed), at, batches)

    def recover(self, lost: ReplicaLost, at: Position, batches: list) -> None:
        """Bring every replica to the most advanced survivor's step, and `at` with them: that
        step's gradient is computed again. A ReplicaError where the policy says stop."""
        detected, detected_at = time.perf_counter(), time.time()
        self.pipeline.drain()
        self.output.replica_lost(lost)
        names, step, replacement, snapshot, stacks, capped = self._replace(lost, at)
        record = loss_record(lost, names, step, replacement, self.group.size, detected_at, hung=sorted(stacks),
                             capped=capped)
        if stacks:  # where the replicas killed as hung were stuck (py-spy), for the event log
            record["stacks"] = stacks
        at.restarts.append(record)
        self.pipeline.membership_changed()
        # the losses of steps the driver had not gathered yet come with the snapshot
        first = self.plan.first_step(at.epoch)
        at.trim(step - first)
        for k in range(len(at.losses), step - first):
            at.add(snapshot.losses[first + k], len(batches[k]))
        at.index = step - first
        enough = self.policy.after_replacement(self.group.size)
        if not enough.recover:  # stop with a checkpoint of the step to redo; the loss in the run's records
            reason = enough.reason if not capped else (f"{', '.join(capped)} timed out {self.policy.max_hangs} "
                                                       f"times and is not replaced again: {enough.reason}")
            self.output.record(dict(record))
            path = self.checkpoint()
            raise ReplicaError(f"{reason}; checkpoint {path}; resume with --resume {self.config.output_dir}"
                               if path else f"{reason} (set output_dir to keep a checkpoint)") from lost
        self.output.replaced(record, self.group.size)
        self.output.redoing(record, self.group.size)

        def recovered(now: float) -> None:
            record["recovery_s"] = round(now - detected, 3)
            self.output.recovered(record)

        self.pipeline.after_next_step(recovered)

    def _replace(self, lost: ReplicaLost, at: Position) -> Replaced:
        """Find the lost, ask the policy, replace them (but those that timed out too often),
        restore every replica that is behind."""
        attempt, stacks = 0, {}
        while True:
            try:
                gone = sorted(set(self.group.dead()) | set(lost.ranks or ()))  # ranks: ended by the driver
                stacks.update(self.group.hung_stacks())
                names = [replica_name(rank) for rank in gone]
                survivors = [rank for rank in self.group.ranks if rank not in gone]
                positions = self.group.positions(survivors) if survivors else []
                step = max(positions, default=None)
                decision = self.policy.decide(Failure(
                    str(lost), names, attempt, len(survivors), step, at.restarts[-1] if at.restarts else None,
                    raised=str(lost.error) if isinstance(lost, Retried) else None,
                    hung=tuple(n for n in names if n in stacks), hangs_before=hangs(at.restarts)))
                if not decision.recover:
                    raise ReplicaError(f"{decision.reason}; {self.kept()}", rank=lost.rank, step=lost.step) from lost
                source = survivors[positions.index(step)]
                behind = [rank for rank, p in zip(survivors, positions) if p < step]
                capped = [rank for rank in gone if replica_name(rank) in decision.capped]
                replacement = self.group.replace(gone, drop=capped)
                fresh = [rank for rank in self.group.ranks if rank not in survivors]
                snapshot = self.group.copy_state(source, behind + fresh,
                                                 losses_since=self.plan.first_step(at.epoch) + len(at.losses))
                self.group.rewire()
                return Replaced(names, step, replacement, snapshot, stacks, list(map(replica_name, capped)))
            except ReplicaLost as again:  # another loss while recovering: start over
                lost, attempt = again, attempt + 1


def hangs(restarts: list[dict]) -> Counter[str]:
    """Times each replica was ended as hung in the run's restart records, by name."""
    return Counter(name for record in restarts for name in record.get("hung", ()))
