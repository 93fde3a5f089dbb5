"""FakeGroup: an in-process stand-in for raytorch.group.group.ReplicaGroup, so that the driver's
loop, pipeline and recovery run without Ray (as Ray Train V2's tests swap in a dummy worker group).

It holds real raytorch.replica.actor.Replica objects built in this process. A call runs at once
and its "ref" is its answer; arguments and answers are deep-copied, as Ray's serialization copies
them (no tensor is shared between replicas or with the driver). Gradients travel as on the
object-store wire: each call's handoff is passed to the next call by "reference".

Faults: `lose(rank, at_step)` loses replica `rank` at its first call at or past global step
`at_step` (a run call counts as the step it would compute). From then on its calls, and every call
that takes one of its gradients, answer `Lost`; get() of a Lost raises ReplicaLost (ranks=None, as
Ray reports a dead actor), dead() lists the rank until replace() builds it afresh. A lost replica
dies as its call starts (before it applies anything). Each fault fires once: lose the same rank
twice to lose its replacement too; `during` limits a fault to one group method (a loss while
starting, restoring or recovering), and a rank in `no_room` is dropped by replace(), not rebuilt.
`hang(rank, at_step)` loses it as found hung (hung_stacks() names it); `fail(rank, at_step)` has
its call raise instead (get() raises the ReplicaError a replica's exception becomes), the replica
left alive until end() ends it.

The replicas share this process's torch random generator: use models without randomness (dropout).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, NamedTuple, Optional, Sequence

from raytorch.core.naming import replica_name
from raytorch.errors import ReplicaError, ReplicaLost
from raytorch.group.records import Member, Replacement
from raytorch.replica.actor import Replica


class Lost(NamedTuple):
    """The ref of a call that met lost replica `rank`: get() raises ReplicaLost."""

    rank: int


class Raised(NamedTuple):
    """The ref of a call in which replica `rank` raised at `step`: get() raises its ReplicaError."""

    rank: int
    step: int


class Killed(Exception):
    """Why a fake replica died: what Ray's ActorDiedError is to a real one (a loss record's "cause")."""


class FakeGroup:
    """The replicas of a run, in this process, in rank order; the same calls as ReplicaGroup."""

    def __init__(self, config, run_name: str = "", **replica_args):
        """replica_args: what Replica takes after its rank and config (model_fn, loss_fn, init_state, ...)."""
        self.config, self.run_name, self.replica_args = config, run_name, replica_args
        self.replicas: dict[int, Replica] = {rank: self._build(rank) for rank in range(config.workers)}
        self.wire, self.wire_reason = "object_store", ""
        self.faults: list[tuple[int, int, Optional[str], str]] = []  # (rank, at_step, during, kind): each fires once
        self.broken: dict[int, int] = {}  # ranks that raised, and at which step: alive until end()
        self.stacks: dict[str, None] = {}  # the replicas found hung, since hung_stacks() last took them
        self.gone: set[int] = set()  # lost and not replaced yet
        self.no_room: set[int] = set()  # ranks replace() drops instead of rebuilding (no room in time)
        self.replaced: list[list[int]] = []  # the ranks of each replace() call
        self.rewired = 0
        self.progress: list[str] = []
        self.closed = False

    def _build(self, rank: int) -> Replica:
        return Replica(rank, self.config, run_name=self.run_name, **self.replica_args)

    # -- faults --------------------------------------------------------------------------------------

    def lose(self, rank: int, at_step: int = 0, during: Optional[str] = None) -> None:
        """Lose replica `rank` at its first call at or past global step `at_step`; with `during`
        (a group method's name: "settle", "positions", "copy_state", "restore", ...) only in that one."""
        self.faults.append((rank, at_step, during, "lost"))

    def hang(self, rank: int, at_step: int = 0) -> None:
        """Lose replica `rank` at `at_step` as a replica found hung and ended (step_timeout)."""
        self.faults.append((rank, at_step, None, "hung"))

    def fail(self, rank: int, at_step: int = 0) -> None:
        """Replica `rank` raises in its first call at or past global step `at_step` (it stays alive)."""
        self.faults.append((rank, at_step, None, "raised"))

    def _call(self, method: str, rank: int, fn, *args, step: Optional[int] = None) -> Any:
        """Replica `rank`'s answer to fn(*args) as a ref: Lost where it is (or is now) lost, or an
        argument is a Lost (the call would wait on a dead replica's gradient)."""
        step = self.replicas[rank].steps if step is None else step
        fault = next((f for f in self.faults if f[0] == rank and step >= f[1] and f[2] in (None, method)), None)
        if fault is not None and rank not in self.gone and rank not in self.broken:
            self.faults.remove(fault)
            if fault[3] == "raised":
                self.broken[rank] = step
            else:
                self.gone.add(rank)
            if fault[3] == "hung":
                self.stacks[replica_name(rank)] = None
        if rank in self.gone:
            return Lost(rank)
        if rank in self.broken:  # it raised: its later calls fail too (its wire has failed), until end()
            return Raised(rank, self.broken[rank])
        lost = [arg for arg in args if isinstance(arg, (Lost, Raised))]
        if lost:
            return lost[0]
        return copy.deepcopy(fn(*copy.deepcopy(args)))

    def _each(self, method: str, name: str, *args) -> list:
        """Every replica's answer to Replica.<name>(*args), gotten."""
        return self.get([self._call(method, rank, getattr(r, name), *args) for rank, r in self.replicas.items()])

    # -- membership ------------------------------------------------------------------------------------

    @property
    def members(self) -> list[Member]:
        return [Member(replica, rank, None, None) for rank, replica in self.replicas.items()]

    @property
    def ranks(self) -> list[int]:
        return list(self.replicas)

    @property
    def size(self) -> int:
        return len(self.replicas)

    @property
    def actors(self) -> list[Replica]:
        return list(self.replicas.values())

    # -- starting and stopping ---------------------------------------------------------------------------

    def settle(self) -> None:
        """ReplicaLost naming those lost while starting, as ReplicaGroup.settle."""
        answers = {rank: self._call("settle", rank, r.ready) for rank, r in self.replicas.items()}
        dead = [rank for rank, answer in answers.items() if isinstance(answer, Lost)]
        if dead:
            names = ", ".join(map(replica_name, dead))
            raise ReplicaLost(f"{names} died while starting", ranks=dead) from Killed("by the test")
        self.rewire()

    def described(self) -> list[dict]:
        infos = [r.ready() for r in self.replicas.values()]
        return [dataclasses.replace(info, node_id="in-process").described(self.wire) for info in infos]

    def rewire(self) -> None:
        self.rewired += 1
        self.wire_reason = "in-process replicas (tests/fakegroup.py)"

    def close(self) -> None:
        self.closed = True

    # -- the driver's calls --------------------------------------------------------------------------------

    def run(self, plans: list, carried: list, name: str) -> tuple[list, list]:
        calls = []
        for (rank, replica), plan in zip(self.replicas.items(), plans):
            computing = replica.steps + (plan[0][1] is not None)  # the step whose gradient it computes
            answer = self._call("run", rank, replica.run, plan, *carried, step=computing)
            calls.append((answer, answer) if isinstance(answer, (Lost, Raised)) else answer)
        return [handoff for handoff, _ in calls], [report for _, report in calls]

    def apply(self, reduce, carried: list) -> list:
        return [self._call("apply", rank, r.apply, reduce, *carried) for rank, r in self.replicas.items()]

    def get(self, refs: Sequence, timeout: Optional[float] = None) -> list:
        lost = next((ref for ref in refs if isinstance(ref, Lost)), None)
        if lost is not None:
            raise ReplicaLost(f"replica {lost.rank} died: lost by the test", rank=lost.rank) from Killed("by the test")
        raised = next((ref for ref in refs if isinstance(ref, Raised)), None)
        if raised is not None:
            raise ReplicaError(f"replica {raised.rank} failed in run after {raised.step} steps: RuntimeError: raised "
                               "by the test", rank=raised.rank, step=raised.step)
        return list(refs)

    def drain(self, refs: Sequence, timeout: Optional[float] = None) -> None:
        pass  # nothing in flight: every call ran when made

    def evaluate(self, parts: Sequence, chunk: int) -> list:
        return self.get([self._call("evaluate", rank, r.evaluate, part, chunk)
                         for (rank, r), part in zip(self.replicas.items(), parts)])

    def digests(self) -> list[str]:
        return self._each("digests", "digest")

    def memory(self) -> list[dict]:
        return self._each("memory", "memory")

    def profiles(self) -> list[dict]:
        return self._each("profiles", "profile")

    def liveness(self) -> list:
        return self._each("liveness", "ping")

    def state(self) -> dict:
        rank, replica = next(iter(self.replicas.items()))
        return self.get([self._call("state", rank, replica.state)])[0]

    def snapshot(self):
        rank, replica = next(iter(self.replicas.items()))
        return self.get([self._call("snapshot", rank, replica.snapshot, 0)])[0]

    def positions(self, ranks: Sequence[int]) -> list[int]:
        return self.get([self._call("positions", rank, self.replicas[rank].position) for rank in ranks])

    def log_progress(self, line: str) -> None:
        self.progress.append(line)

    # -- losses and membership -------------------------------------------------------------------------------

    def dead(self) -> list[int]:
        return sorted(self.gone)

    def hung_stacks(self) -> dict:
        stacks, self.stacks = self.stacks, {}
        return stacks

    def end(self, ranks: Sequence[int]) -> None:
        self.gone.update(ranks)
        for rank in ranks:
            self.broken.pop(rank, None)

    def replace(self, lost: Sequence[int], drop: Sequence[int] = ()) -> Replacement:
        """A fresh replica for each lost rank (from the same arguments), or none for those in no_room or `drop`."""
        self.replaced.append(list(lost))
        replaced, dropped = [], []
        for rank in lost:
            self.gone.discard(rank)
            if rank in self.no_room or rank in drop:
                del self.replicas[rank]
                dropped.append(rank)
            else:
                self.replicas[rank] = self._build(rank)  # in its place: the dict keeps rank order
                replaced.append(rank)
        return Replacement(replaced, dropped, [])

    def copy_state(self, source: int, to: Sequence[int], losses_since: int):
        snapshot = self._call("copy_state", source, self.replicas[source].snapshot, losses_since)
        self.get([self._call("copy_state", rank, self.replicas[rank].restore, snapshot) for rank in to])
        return self.get([snapshot])[0]

    def restore(self, snapshot) -> None:
        self._each("restore", "restore", snapshot)
        self.rewire()

    # elastic growth and node moves are not faked: nothing ever joins or moves
    def joining(self) -> bool:
        return False

    def moving(self) -> bool:
        return False

    def grow(self):
        raise NotImplementedError("FakeGroup has no replica waiting to join")

    def move(self) -> list[str]:
        raise NotImplementedError("FakeGroup has no replica to move")
