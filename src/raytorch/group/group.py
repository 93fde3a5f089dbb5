"""ReplicaGroup: the live replicas of a run in wire order, and the only caller of Ray for them.
It starts them, makes the driver's calls (typed: each a method with a typed answer), finds the
dead and the hung, replaces, moves and takes in replicas, and sets up the wire between them. It
reports a loss (ReplicaLost) and does what it is asked; what to do about a loss, the driver decides.
"""

from __future__ import annotations

import contextlib
import sys
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np
import ray

from ..config.schema import TrainConfig
from ..core.naming import replica_name
from ..core.snapshot import Snapshot
from ..errors import ReplicaLost
from ..replica.replies import Liveness, Score
from ..wire.shared_memory import SHM_DIR
from .errors import ReplicaTimeout, gather
from .health import Hangs, end_replica, take_errors
from .launch import Launcher, built
from .records import Member, Replacement
from .roster import Roster
from .wiring import connect_wire


class ReplicaGroup:
    """The live replicas in wire order (position p holds `members[p]`), the idle spares, the
    replicas starting to join or to stand in, and how gradients travel between them."""

    def __init__(self, config: TrainConfig, run_name: str, replica_args: dict):
        self.config, self.run_name = config, run_name
        self.roster = Roster(config, Launcher(config, run_name, replica_args))  # who the replicas are
        self.hangs = Hangs(config.step_timeout)  # finds and ends hung replicas, keeping their stacks
        self.progress_sent: Optional[ray.ObjectRef] = None  # the last progress line's call (log_progress)
        self.wire, self.wire_reason = "object_store", ""  # how gradients travel, and why (rewire)

    @property
    def members(self) -> list[Member]:
        return self.roster.members

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self.members]

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def actors(self) -> list:
        return [m.actor for m in self.members]

    # -- starting and stopping ----------------------------------------------------------------

    def launch(self) -> None:
        """Start every replica and the spares beside them; settle() waits until they are built."""
        self.roster.launch()

    def settle(self) -> None:
        """Wait until every member is built, then connect the wire. ReplicaLost naming those that
        died meanwhile (the driver has them replaced and asks again)."""
        infos, dead, died = built(self.actors, [a.ready.remote() for a in self.actors])
        self.roster.members = [m._replace(info=infos.get(p, m.info)) for p, m in enumerate(self.members)]
        if dead:
            ranks = [self.members[p].rank for p in dead]
            raise ReplicaLost(f"{', '.join(map(replica_name, ranks))} died while starting", ranks=ranks) from died
        self.rewire()

    def described(self) -> list[dict]:
        """Each replica as the console and the run's records describe it."""
        return [m.info.described(self.wire) for m in self.members]

    def rewire(self) -> None:
        """Pick how gradients travel (see TrainConfig.reduction) and set it up afresh."""
        self.wire, self.wire_reason = connect_wire(self.config, self.actors, [m.info for m in self.members],
                                                   f"{self.run_name}-g{self.roster.generation}")

    def close(self) -> None:
        """End every replica; remove what shared memory they leave."""
        self.roster.close()
        # shared-memory names a replica created and could not remove (killed while the wire was set
        # up): those on this node
        for path in SHM_DIR.glob(f"{self.run_name}-g*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- the driver's calls ---------------------------------------------------------------------

    def run(self, plans: list, carried: list, name: str) -> tuple[list, list]:
        """Each replica follows its plan (Replica.run), the dashboard's task list showing `name`;
        returns the refs of their handoffs (gradients) and of their RunReports (get them with get)."""
        calls = [m.actor.run.options(name=name).remote(plan, *carried) for m, plan in zip(self.members, plans)]
        return [c[0] for c in calls], [c[1] for c in calls]

    def apply(self, reduce, carried: list) -> list:
        """Every replica applies an all-reduce on its own (Replica.apply); returns the calls' refs."""
        return [m.actor.apply.remote(reduce, *carried) for m in self.members]

    def evaluate(self, parts: Sequence[np.ndarray], chunk: int) -> list[Score]:
        """Replica p scores the eval samples at parts[p], in chunks of `chunk` (fully sharded, in `rounds`)."""
        rounds = max(-(-len(part) // chunk) for part in parts)
        return self.get([m.actor.evaluate.remote(part, chunk, rounds) for m, part in zip(self.members, parts)])

    def digests(self) -> list[str]:
        """Each replica's SHA-256 of its parameters' bytes (equal: bit-identical replicas)."""
        return self.get([m.actor.digest.remote() for m in self.members])

    def memory(self) -> list[dict[str, int]]:
        """Bytes each replica holds, by kind (Replica.memory): what TrainResult.replica_memory reports."""
        return self.get([m.actor.memory.remote() for m in self.members])

    def profiles(self) -> list[dict]:
        """Each replica's profile of the profiled steps (Replica.profile)."""
        return self.get([m.actor.profile.remote() for m in self.members])

    def liveness(self) -> list[Liveness]:
        """Each replica's answer to a ping, after the calls queued before."""
        return self.get([m.actor.ping.remote() for m in self.members])

    def state(self) -> dict:
        """The model's state_dict (the first replica's: replicas are equal), on CPU."""
        return self._first("state")

    def snapshot(self) -> Snapshot:
        """Everything the next steps depend on (the first replica's: replicas are equal)."""
        return self._first("snapshot", 0)

    def _first(self, method: str, *args):
        """The first replica's answer; fully sharded, every replica takes part (gathered onto the first)."""
        takers = self.members if self.config.shard == "full" else self.members[:1]
        return self.get([getattr(m.actor, method).remote(*args) for m in takers])[0]

    def positions(self, ranks: Sequence[int]) -> list[int]:
        """Steps applied by each of `ranks` (after the calls queued before)."""
        actor = {m.rank: m.actor for m in self.members}
        return self.get([actor[rank].position.remote() for rank in ranks])

    def log_progress(self, line: str) -> None:
        """A progress line into the first replica's actor log (its health thread; not waited for:
        the previous line's call is taken here, its error too, where that replica has died)."""
        if self.progress_sent is not None and ray.wait([self.progress_sent], timeout=0)[0]:
            with contextlib.suppress(Exception):
                ray.get(self.progress_sent)
        self.progress_sent = self.members[0].actor.ping.remote(line)

    def get(self, refs: Sequence, timeout: float | None = None):
        """The calls' answers (Ray's errors made ours); a replica that stops answering for
        step_timeout is found and killed: ReplicaLost then, as for one that died."""
        limit = self.config.step_timeout if timeout is None else timeout
        while True:
            try:
                return gather(self.actors, refs, timeout=limit)
            except ReplicaTimeout as timed_out:
                lost = self.hangs.lost(self.members)
                if lost is not None:
                    raise lost from timed_out
                # every replica answers and none is stuck in a step: slow, not hung; wait on

    def drain(self, refs: Sequence, timeout: Optional[float] = None) -> None:
        """Wait out calls that met a lost replica (they fail at once, or finish) and take their
        errors, which Ray would otherwise print as unhandled."""
        take_errors(refs, self.config.step_timeout if timeout is None else timeout)

    # -- losses and membership -------------------------------------------------------------------

    def dead(self) -> list[int]:
        """Ranks of the replicas that are gone; a hung one is killed and counted with them."""
        hung, gone = self.hangs.find(self.members)
        self.hangs.end(self.members, hung)
        return sorted(self.members[p].rank for p in gone + [position for position, _ in hung])

    def hung_stacks(self) -> dict[str, Optional[str]]:
        """The Python stacks of the replicas ended as hung since last asked, by name (py-spy)."""
        return self.hangs.take()

    def copy_state(self, source: int, to: Sequence[int], losses_since: int) -> Snapshot:
        """Load replica `source`'s state into replicas `to` (ranks); returns the snapshot, with the
        global losses of its applied steps from `losses_since` on."""
        actor = {m.rank: m.actor for m in self.members}
        snapshot = actor[source].snapshot.remote(losses_since)
        self.get([actor[rank].restore.remote(snapshot) for rank in to])
        return self.get([snapshot])[0]

    def restore(self, snapshot: Snapshot) -> None:
        """Every replica becomes the one that took `snapshot` (a resume); the wire starts afresh
        at its step. ReplicaLost where one is lost meanwhile (the driver has it replaced, and asks again)."""
        shared = ray.put(snapshot)
        self.get([m.actor.restore.remote(shared) for m in self.members])
        if self.config.shard != "full":  # FSDP2's group holds no step: the shards stay where they are
            self.rewire()

    def end(self, ranks: Sequence[int]) -> None:
        """End live replicas `ranks` (one that raised, to be replaced); their peers stop waiting for them."""
        for position in [p for p, member in enumerate(self.members) if member.rank in ranks]:
            end_replica(self.members, position)

    def replace(self, lost: Sequence[int], drop: Sequence[int] = ()) -> Replacement:
        """Replace the lost ranks but `drop` (Roster.replace): the group holds survivors and replacements."""
        return self.roster.replace(lost, drop)

    def joining(self) -> bool:
        """Elastic runs: whether a replica waits to join (polled between calls; never blocks)."""
        return self.roster.joining()

    def grow(self) -> Member:
        """Take the waiting replica in, with a live replica's state, on a fresh wire (between steps)."""
        member = self.roster.take_joiner()
        self.copy_state(self.members[0].rank, [member.rank], losses_since=sys.maxsize)
        self.rewire()
        return member

    def moving(self) -> bool:
        """Whether a stand-in for a replica on a draining node is built (polled between calls); fully
        sharded, never: a stand-in cannot take a shard over yet (the replica is lost with its node)."""
        return self.config.shard != "full" and self.roster.moving()

    def move(self) -> list[str]:
        """Each built stand-in takes the place of the replica it stands in for, with its state, on a
        fresh wire (between steps: nothing is redone); that replica is ended. Returns their names."""
        moved = self.roster.take_moves()
        for member, old in moved.values():
            self.get([member.actor.restore.remote(old.actor.snapshot.remote())])
            ray.kill(old.actor)
        self.rewire()
        return [replica_name(rank) for rank in moved]


@contextmanager
def replica_group(config: TrainConfig, run_name: str, **replica_args) -> Iterator[ReplicaGroup]:
    """Reserve room for all replicas and start them (settle() waits until each is built); kill
    them all on exit. A start that fails half way still kills what it started and frees the
    reservation."""
    group = ReplicaGroup(config, run_name, replica_args)
    try:
        group.launch()
        yield group
    finally:
        group.close()
