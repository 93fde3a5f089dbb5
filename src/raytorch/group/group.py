"""The live replicas of a run: starting them as Ray actors, calling them, replacing the lost, and
turning Ray's errors into ours."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from ..config.schema import TrainConfig
from ..core.snapshot import Snapshot
from ..driver.recovery import RecoveryPolicy, until_settled
from ..errors import ClusterError, PeerError, ReplicaError, ReplicaLost
from ..output.report import replica_name, stuck_in
from ..replica.actor import Replica
from ..replica.device import replica_env, replica_resources, wants_huge_pages, whole_gpus
from ..wire.shared_memory import PEER_TIMEOUT_S, SHM_DIR, choose, shared_memory_shortfall
from .placement import reserve_replicas

START_TIMEOUT_S = 300.0
DRAIN_LOOK_S = 2.0  # how often to ask Ray which nodes are draining (their replicas are moved)
GROW_LOOK_S = 2.0  # elastic runs: how often to look for room for one more replica
PY_SPY_S = 15.0  # a hung replica's stack, taken before it is killed: at most this long
PING_TIMEOUT_S = 10.0  # a replica's health thread answers at once unless its process is stopped
SHARED_ARGS = ("init_state", "train_set", "eval_set")  # put in the object store once, read by every replica


Bundle = tuple[PlacementGroup, int]  # a placement group and the index of one of its bundles


class Member(NamedTuple):
    """One live replica: its actor, its rank (replica-<rank> for good), its placement bundle, and
    where it runs (what its ready() reported)."""

    actor: Any
    rank: int
    bundle: Bundle
    info: dict


class Spare(NamedTuple):
    """An idle replica, started ahead to take a lost one's place."""

    actor: Any
    ready: Any  # the ObjectRef of its ready() call
    bundle: Bundle
    name: str


class Spares:
    """The idle replicas started ahead (oldest first): `create(rank, bundle, name)` starts one."""

    def __init__(self, create: Callable[[int, Bundle, str], Any]):
        self.create = create
        self.idle: list[Spare] = []

    def add(self, bundle: Bundle, generation: int) -> None:
        """Start a spare in `bundle`, in the background."""
        name = f"spare-{bundle[1]}" + (f".{generation}" if generation else "")
        actor = self.create(bundle[1], bundle, name)
        self.idle.append(Spare(actor, actor.ready.remote(), bundle, name))

    def stand_in(self, lost: Sequence[Member], generation: int) -> tuple[dict[int, Member], list[str], list[Member]]:
        """Ready spares in the places of `lost` (each freed bundle gets a new spare, started in the
        background): the members they became, by rank; their names; the lost that got none."""
        taken, names, left = {}, [], []
        for member in lost:
            spare = self.take(member.rank)
            if spare is None:
                left.append(member)
                continue
            taken[member.rank], name = spare
            names.append(name)
            self.add(member.bundle, generation)
        return taken, names, left

    def take(self, rank: int, avoid: frozenset = frozenset()) -> Optional[tuple[Member, str]]:
        """A built spare (on none of the nodes `avoid`), now replica `rank`, and its name; None if
        none is ready."""
        for spare in list(self.idle):
            if not ray.wait([spare.ready], timeout=0)[0] or ray.get(spare.ready).get("node_id") in avoid:
                continue  # still starting, or on a node about to go
            self.idle.remove(spare)
            try:
                ray.get(spare.actor.adopt.remote(rank), timeout=PING_TIMEOUT_S)
                return Member(spare.actor, rank, spare.bundle, dict(ray.get(spare.ready), rank=rank)), spare.name
            except (RayActorError, RayTaskError, GetTimeoutError):
                ray.kill(spare.actor, no_restart=True)  # lost with its node, or broken: try the next
        return None


class Starting(NamedTuple):
    """A replica started in the background (to join, or to stand in): its actor, the ref of its
    ready() call, its bundle."""

    actor: Any
    ready: Any
    bundle: Bundle

    def arrived(self, rank: int) -> tuple[bool, Optional[Member]]:
        """Whether its start has ended (never blocks), and the member it became as replica `rank`
        (None where it died while starting, with its node)."""
        if not ray.wait([self.ready], timeout=0)[0]:
            return False, None
        try:
            return True, Member(self.actor, rank, self.bundle, ray.get(self.ready))
        except (RayActorError, RayTaskError):
            return True, None


def new_bundle(resources: dict, placements: list[PlacementGroup]) -> Bundle:
    """A bundle of `resources` in a new placement group of one (kept in `placements`, removed at
    close): Ray places it where room is, off draining nodes, and an autoscaler sees it as demand."""
    placements.append(placement_group([dict(resources)]))
    return placements[-1], 0


def release(actors: Sequence, placements: Sequence[PlacementGroup]) -> None:
    for actor in actors:
        ray.kill(actor)
    for group in placements:
        remove_placement_group(group)


class Growth:
    """Room for more replicas, up to TrainConfig.max_workers, sought while the run goes on: a vacant
    bundle (a dropped replica's, or else a new placement group of one) gets a replica started in
    it in the background, one at a time; once it is built the group takes it in between steps
    (ReplicaGroup.grow)."""

    def __init__(self, create: Callable[[int, Bundle, str], Any], bundle: dict, most: int, next_rank: int):
        self.create, self.bundle, self.most, self.next_rank = create, bundle, most, next_rank
        self.vacant: list[Bundle] = []  # bundles with no replica: dropped ones, or made here
        self.placements: list[PlacementGroup] = []  # the one-bundle groups made here
        self.pending: Optional[Starting] = None  # the replica on its way
        self.built: Optional[Member] = None  # a replica built and waiting to join
        self.next_look = 0.0

    def ready(self, size: int) -> bool:
        """Whether a replica is built and waits to join a group of `size`; if none is on its way
        and the group is below most, start one where room may come. Never blocks."""
        if self.built is None and self.pending is None and size < self.most and time.monotonic() >= self.next_look:
            self.next_look = time.monotonic() + GROW_LOOK_S
            bundle = self.vacant.pop(0) if self.vacant else new_bundle(self.bundle, self.placements)
            actor = self.create(self.next_rank, bundle, replica_name(self.next_rank))
            self.pending = Starting(actor, actor.ready.remote(), bundle)
        if self.pending is not None:
            done, member = self.pending.arrived(self.next_rank)
            if done and member is None:  # lost while starting (with its node): look again later
                self.vacant.append(self.pending.bundle)
            elif done:
                self.built, self.next_rank = member, self.next_rank + 1
            self.pending = None if done else self.pending
        return self.built is not None and size < self.most

    def close(self) -> None:
        release([m.actor for m in (self.pending, self.built) if m is not None], self.placements)


class Moves:
    """Replicas on a node Ray marks as draining (a spot preemption, `ray drain-node`, an autoscaler's
    scale-down) are moved before the node goes: for each, a stand-in (a ready spare elsewhere, or a
    replica started in a new placement group of one, which Ray places on a node that is not
    draining) is started in the background; once built, it takes the replica's place between
    steps with its state (ReplicaGroup.move): nothing is redone."""

    def __init__(self, create: Callable[[int, Bundle, str], Any], spares: Spares, bundle: dict):
        self.create, self.spares, self.bundle = create, spares, bundle
        self.pending: dict[int, Starting] = {}  # rank: a stand-in on its way
        self.built: dict[int, Member] = {}  # rank: a stand-in ready to take the place
        self.placements: list[PlacementGroup] = []  # the one-bundle groups made here
        self.gcs: Any = None  # a client of Ray's GCS, made on the first look
        self.next_look = 0.0

    def ready(self, members: Sequence[Member], generation: int) -> bool:
        """Whether a stand-in is built for one of `members`; every DRAIN_LOOK_S, start one for each
        replica found on a draining node. Never blocks for long (one question to Ray's GCS)."""
        if time.monotonic() >= self.next_look:
            self.next_look = time.monotonic() + DRAIN_LOOK_S
            draining = self.draining_nodes()
            for m in members:
                if m.info.get("node_id") in draining and m.rank not in self.pending and m.rank not in self.built:
                    self._stand_in(m, generation, draining)
        for rank, starting in list(self.pending.items()):
            done, member = starting.arrived(rank)
            if done:  # where it died while starting, the next look starts another
                del self.pending[rank]
                if member is not None:
                    self.built[rank] = member
        return any(m.rank in self.built for m in members)

    def draining_nodes(self) -> frozenset:
        """Ids of the nodes Ray marks as draining; none where Ray's GCS cannot be asked."""
        try:
            if self.gcs is None:
                from ray._raylet import GcsClient

                self.gcs = GcsClient(address=ray.get_runtime_context().gcs_address)
            return frozenset(self.gcs.get_draining_nodes(timeout=5))
        except Exception:  # noqa: BLE001  (a question, not a duty: the run goes on, losses are recovered)
            return frozenset()

    def _stand_in(self, member: Member, generation: int, draining: frozenset) -> None:
        spare = self.spares.take(member.rank, avoid=draining)
        if spare is not None:
            self.built[member.rank] = spare[0]
            return
        bundle = new_bundle(self.bundle, self.placements)
        actor = self.create(member.rank, bundle, f"{replica_name(member.rank)}.moved{generation}")
        self.pending[member.rank] = Starting(actor, actor.ready.remote(), bundle)

    def take(self, ranks: Sequence[int]) -> dict[int, Member]:
        """The built stand-ins for `ranks`, handed over."""
        return {rank: self.built.pop(rank) for rank in list(self.built) if rank in ranks}

    def close(self) -> None:
        release([s.actor for s in self.pending.values()] + [m.actor for m in self.built.values()], self.placements)


class Replacement(NamedTuple):
    """What replace() did: ranks replaced, ranks dropped (no room in time), spares used (by name)."""

    replaced: list[int]
    dropped: list[int]
    spares_used: list[str]


class ReplicaCalls:
    """The driver's requests to the live replicas (`members`, in wire order: position p holds
    members[p]), each to every replica unless said otherwise, and Ray's errors made raytorch's
    (gather): a replica that stops answering for step_timeout is found, its stack kept, killed."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.members: list[Member] = []
        self.hung_stacks: dict[str, Optional[str]] = {}  # py-spy dumps of replicas killed as hung, by name
        self.progress_sent: Optional[ray.ObjectRef] = None  # the last progress line's call (log_progress)

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self.members]

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def actors(self) -> list:
        return [m.actor for m in self.members]

    def run(self, plans: list, carried: list, name: str) -> tuple[list, list]:
        """Each replica follows its plan (Replica.run), the dashboard's task list showing `name`;
        returns the refs of their handoffs (gradients) and of their RunReports."""
        calls = [m.actor.run.options(name=name).remote(plan, *carried) for m, plan in zip(self.members, plans)]
        return [c[0] for c in calls], [c[1] for c in calls]

    def apply(self, reduce, carried: list) -> list:
        """Every replica applies an all-reduce on its own (Replica.apply); returns the calls' refs."""
        return [m.actor.apply.remote(reduce, *carried) for m in self.members]

    def call_all(self, method: str, *args) -> list:
        """Every replica's answer to `method(*args)`, in wire order."""
        return self.get([getattr(m.actor, method).remote(*args) for m in self.members])

    def call_each(self, method: str, args: Sequence[tuple]) -> list:
        """Replica p's answer to `method(*args[p])`, in wire order."""
        return self.get([getattr(m.actor, method).remote(*a) for m, a in zip(self.members, args)])

    def log_progress(self, line: str) -> None:
        """A progress line into the first replica's actor log (its health thread; not waited for:
        the previous line's call is taken here, its error too, where that replica has died)."""
        if self.progress_sent is not None and ray.wait([self.progress_sent], timeout=0)[0]:
            with contextlib.suppress(Exception):
                ray.get(self.progress_sent)
        self.progress_sent = self.members[0].actor.ping.remote(line)

    def first(self, method: str, *args):
        """The first replica's answer to `method(*args)` (its state stands for all: they are equal)."""
        return self.get([getattr(self.members[0].actor, method).remote(*args)])[0]

    def positions(self, ranks: Sequence[int]) -> list[int]:
        """Steps applied by each of `ranks` (after the calls queued before)."""
        actor = {m.rank: m.actor for m in self.members}
        return self.get([actor[rank].position.remote() for rank in ranks])

    def get(self, refs: Sequence, timeout: float | None = None):
        """gather(), where a replica that stops answering for step_timeout is found and killed:
        ReplicaLost then, as for one that died."""
        limit = self.config.step_timeout if timeout is None else timeout
        while True:
            try:
                return gather(self.actors, refs, timeout=limit)
            except ReplicaTimeout as timed_out:
                hung, _ = health(self.actors, self.config.step_timeout)
                if hung:
                    self._end(hung)
                    names = ", ".join(f"{name} ({why}{stuck_in(self.hung_stacks.get(name))})"
                                      for name, why in ((replica_name(self.members[p].rank), why) for p, why in hung))
                    raise ReplicaLost(f"{names}: treated as dead after step_timeout "
                                      f"{self.config.step_timeout:g} s") from timed_out
                # every replica answers and none is stuck in a step: slow, not hung; wait on

    def drain(self, refs: Sequence, timeout: Optional[float] = None) -> None:
        """Wait out calls that met a lost replica (they fail at once, or finish) and take their
        errors, which Ray would otherwise print as unhandled."""
        take_errors(refs, self.config.step_timeout if timeout is None else timeout)

    def _end(self, hung: Sequence[tuple[int, str]]) -> None:
        """End the hung replicas (positions, with why), their Python stacks kept first (hung_stacks)."""
        for position, _ in hung:
            self.hung_stacks[replica_name(self.members[position].rank)] = end_hung(self.members, position)


class ReplicaGroup(ReplicaCalls):
    """The live replicas in wire order (position p holds `members[p]`): starting them, replacing
    the lost, taking in new ones, the idle spares, and how gradients travel between them. With
    ReplicaCalls, the only caller of Ray for replicas: the driver asks the group."""

    def __init__(self, config: TrainConfig, run_name: str, replica_args: dict):
        super().__init__(config)
        self.run_name = run_name
        self.huge_pages = wants_huge_pages(replica_args.get("init_state") or {})
        # the big arguments go to the object store once: every replica (and replacement) reads them there
        self.replica_args = {name: ray.put(value) if name in SHARED_ARGS and value is not None else value
                             for name, value in replica_args.items()}
        self.actor_class = ray.remote(concurrency_groups={"health": 1})(Replica)
        bundles = [replica_resources(config, rank) for rank in range(config.workers + config.spares)]
        # elastic (max_workers): as many as fit now, at least workers; room that comes later: growth
        self.reservation = reserve_replicas(bundles, config.workers, config.max_workers or config.workers,
                                            config.placement, config.resource_timeout)
        self.placement, self.workers = self.reservation.group, self.reservation.workers
        self.growth = (Growth(self._create, bundles[0], config.max_workers, self.workers + config.spares)
                       if config.max_workers else None)
        self.spares = Spares(self._create)
        self.moves = Moves(self._create, self.spares, bundles[0])  # off nodes that are draining
        self.wire, self.wire_reason = "object_store", ""  # how gradients travel, and why (rewire)
        self.generation = 0  # bumped by every change of membership: fresh shared-memory names
        self.losses: list[dict] = []  # replicas lost while starting or restoring, replaced (until_settled)

    def start(self) -> list[dict]:
        """Start every replica (a member at once, so close() ends a start that fails) and wait until
        each is built; returns what each reported. Spares start beside them, used once built. A
        replica that dies while starting is replaced (until_settled)."""
        workers = self.workers
        first = self.reservation.first  # 0, or 1 in a Tune trial's placement group (bundle 0: its driver)
        self.members = [Member(self._create(rank, (self.placement, first + rank), replica_name(rank)), rank,
                               (self.placement, first + rank), {}) for rank in range(workers)]
        for index in range(workers, workers + self.config.spares):
            self.spares.add((self.placement, first + index), self.generation)
        self.losses += until_settled(self._settle, self, RecoveryPolicy(self.config.min_workers), "starting")
        return self.described()

    def _settle(self) -> None:
        """Wait until every member is built, then connect the wire. ReplicaLost naming those that died."""
        infos, dead, died = built(self.actors, [a.ready.remote() for a in self.actors])
        self.members = [m._replace(info=infos.get(p, m.info)) for p, m in enumerate(self.members)]
        if dead:
            ranks = [self.members[p].rank for p in dead]
            raise ReplicaLost(f"{', '.join(map(replica_name, ranks))} died while starting", ranks=ranks) from died
        self.rewire()

    def described(self) -> list[dict]:
        return [dict(m.info, wire=self.wire) for m in self.members]

    def _create(self, rank: int, bundle: Bundle, name: str):
        return self.actor_class.options(
            num_cpus=self.config.cpus_per_replica,
            num_gpus=self.config.gpus_of(rank),
            scheduling_strategy=PlacementGroupSchedulingStrategy(bundle[0], placement_group_bundle_index=bundle[1]),
            name=name,
            namespace=self.run_name,
            runtime_env=replica_env(self.config, rank, self.huge_pages),
        ).remote(rank, self.config, run_name=self.run_name, **self.replica_args)

    def rewire(self) -> None:
        """Pick how gradients travel (see TrainConfig.reduction) and set it up afresh."""
        self.wire, self.wire_reason = connect_wire(self.config, self.actors, [m.info for m in self.members],
                                                   f"{self.run_name}-g{self.generation}")

    def copy_state(self, source: int, to: Sequence[int], losses_since: int) -> Snapshot:
        """Load replica `source`'s state into replicas `to` (ranks); returns the snapshot, with the
        global losses of its applied steps from `losses_since` on."""
        actor = {m.rank: m.actor for m in self.members}
        snapshot = actor[source].snapshot.remote(losses_since)
        self.get([actor[rank].restore.remote(snapshot) for rank in to])
        return self.get([snapshot])[0]

    def restore(self, snapshot: Snapshot) -> None:
        """Every replica becomes the one that took `snapshot` (a resume); the wire starts afresh
        at its step."""
        shared = ray.put(snapshot)

        def restore_all() -> None:  # again after a replica lost meanwhile is replaced
            self.get([m.actor.restore.remote(shared) for m in self.members])
            self.rewire()

        self.losses += until_settled(restore_all, self, RecoveryPolicy(self.config.min_workers), "restoring")

    # -- health and membership --------------------------------------------------------------------

    def dead(self) -> list[int]:
        """Ranks of the replicas that are gone; a hung one is killed and counted with them."""
        hung, gone = health(self.actors, self.config.step_timeout)
        self._end(hung)
        return sorted(self.members[p].rank for p in gone + [position for position, _ in hung])

    def replace(self, lost: Sequence[int]) -> Replacement:
        """Put a ready spare in the place of each lost rank, or else start a replacement in its
        bundle (Ray re-places a bundle whose node died, where it finds room) and give it
        replace_timeout; a spare's freed bundle gets a new spare, started in the background.
        The group then holds the survivors and the replacements, by rank."""
        self.generation += 1
        members = {m.rank: m for m in self.members if m.rank not in lost}
        taken, spares_used, left = self.spares.stand_in([m for m in self.members if m.rank in lost], self.generation)
        members.update(taken)
        replaced = list(taken)
        started = {m.rank: (self._create(m.rank, m.bundle, f"{replica_name(m.rank)}.{self.generation}"), m.bundle)
                   for m in left}
        built, dropped = await_started(started, self.config.replace_timeout)
        if self.growth is not None:  # elastic: a dropped replica's bundle is where the run may grow again
            self.growth.vacant += [started[rank][1] for rank in dropped]
        members.update(built)
        replaced += list(built)
        self.members = [members[rank] for rank in sorted(members)]
        return Replacement(sorted(replaced), dropped, spares_used)

    def joining(self) -> bool:
        """Elastic runs: whether a replica waits to join (polled between calls; never blocks)."""
        return self.growth is not None and self.growth.ready(self.size)

    def grow(self) -> Member:
        """Take the waiting replica in, with a live replica's state, on a fresh wire (between steps)."""
        member, self.growth.built = self.growth.built, None
        self.members.append(member)  # the highest rank: last in wire order
        self.generation += 1
        self.copy_state(self.members[0].rank, [member.rank], losses_since=sys.maxsize)
        self.rewire()
        return member

    def moving(self) -> bool:
        """Whether a stand-in for a replica on a draining node is built (polled between calls)."""
        return self.moves.ready(self.members, self.generation)

    def move(self) -> list[str]:
        """Each built stand-in takes the place of the replica it stands in for, with its state, on a
        fresh wire (between steps: nothing is redone); that replica is ended. Returns their names."""
        moved = self.moves.take(self.ranks)
        for rank, member in moved.items():
            position = self.ranks.index(rank)
            old = self.members[position]
            self.get([member.actor.restore.remote(old.actor.snapshot.remote())])
            self.members[position] = member
            ray.kill(old.actor)
        self.generation += 1
        self.rewire()
        return [replica_name(rank) for rank in moved]

    def close(self) -> None:
        self.moves.close()
        if self.growth is not None:
            self.growth.close()
        for actor in self.actors + [spare.actor for spare in self.spares.idle]:
            ray.kill(actor)
        # shared-memory names a replica created and could not remove (killed while the wire was set
        # up): those on this node
        for path in SHM_DIR.glob(f"{self.run_name}-g*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.reservation.owned:  # not a Tune trial's: Tune removes its own
            remove_placement_group(self.placement)


@contextmanager
def replica_group(config: TrainConfig, run_name: str, **replica_args) -> Iterator[ReplicaGroup]:
    """Reserve room for all replicas, start them, wait until each is built; kill them all on exit.

    A start that fails half way still kills what it started and frees the reservation.
    """
    group = ReplicaGroup(config, run_name, replica_args)
    try:
        group.start()
        yield group
    finally:
        group.close()


def health(actors: Sequence, step_timeout: float) -> tuple[list[tuple[int, str]], list[int]]:
    """One ping to every replica: (positions of those hung, with the reason; positions of the dead).
    Hung: no answer to the ping, or one step computing for longer than step_timeout."""
    pings = [a.ping.remote() for a in actors]
    wait = min(PING_TIMEOUT_S, step_timeout)
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=wait)
    hung, gone = [], []
    for position, ping in enumerate(pings):
        if ping not in ready:
            hung.append((position, f"no answer to a ping within {wait:g} s"))
            continue
        try:
            computing = ray.get(ping)["computing_s"]
        except RayActorError:
            gone.append(position)
            continue
        if computing is not None and computing > step_timeout:
            hung.append((position, f"one step computing for {computing:.0f} s"))
    return hung, gone


def built(actors: Sequence, refs: Sequence) -> tuple[dict[int, dict], list[int], Optional[Exception]]:
    """Wait for replicas' ready() calls `refs`: what each built one reported (by position), the
    positions of those whose process died while starting, and one such death. A replica whose
    __init__ raised (no retry helps) or that is not built within START_TIMEOUT_S: its ReplicaError."""
    ray.wait(list(refs), num_returns=len(refs), timeout=START_TIMEOUT_S)
    infos, dead, died = {}, [], None
    for position, ref in enumerate(refs):
        try:
            infos[position] = ray.get(ref, timeout=0)
        except RayActorError as e:
            if "error raised in its creation task" in str(e):
                raise _replica_error(actors, e) from e
            dead.append(position)
            died = e
        except (RayTaskError, GetTimeoutError):
            gather(actors, refs, timeout=START_TIMEOUT_S)  # raises it as the replica's error
    return infos, dead, died


def await_started(started: dict[int, tuple[Any, int]], timeout: float) -> tuple[dict[int, Member], list[int]]:
    """Wait up to `timeout` for replacements (rank: (actor, bundle)) to be built: the members
    ready by then, and the ranks of the others (killed)."""
    ready_refs = {rank: actor.ready.remote() for rank, (actor, _) in started.items()}
    ready, _ = ray.wait(list(ready_refs.values()), num_returns=len(ready_refs), timeout=timeout)
    members, dropped = {}, []
    for rank, ref in ready_refs.items():
        info = None
        if ref in ready:
            try:
                info = ray.get(ref)
            except RayActorError:
                pass
        actor, bundle = started[rank]
        if info is None:
            ray.kill(actor, no_restart=True)
            dropped.append(rank)
        else:
            members[rank] = Member(actor, rank, bundle, info)
    return members, dropped


def connect_wire(config: TrainConfig, actors: list, infos: list[dict], prefix: str) -> tuple[str, str]:
    """Pick how gradients travel (see TrainConfig.reduction) and set it up; returns its name and why.
    A collective group's operations time out PEER_TIMEOUT_S past step_timeout: the driver finds a
    hung replica (and names it) before its peers' all-reduce gives up on it."""
    on_gpus = whole_gpus(config, [info["rank"] for info in infos])
    group = ("sync_batchnorm: batch statistics and gradients" if config.sync_batchnorm else
             "grad_dtype bf16: gradients in bfloat16" if config.grad_dtype == "bf16" else None)
    try:
        wire, why = choose(config.reduction, len({info["node_id"] for info in infos}),
                           all(info["shared_memory"] for info in infos), on_gpus, group,
                           shared_memory_shortfall(infos))
    except ValueError as e:
        raise ClusterError(str(e)) from e
    if wire == "collective":  # a fresh group: the first replica's node hosts the rendezvous
        address, port = gather(actors[:1], [actors[0].rendezvous.remote()])[0]
        backend, timeout = "nccl" if on_gpus else "gloo", config.step_timeout + PEER_TIMEOUT_S
        gather(actors, [a.join_collective.remote(p, len(actors), address, port, timeout, backend, config.grad_dtype)
                        for p, a in enumerate(actors)])
        if config.grad_dtype == "bf16" and "bfloat16" not in why:  # not said yet by the group's reason
            why += "; gradients in bfloat16 on the wire"
    elif wire == "object_store":
        gather(actors, [a.use_object_store.remote() for a in actors])
    else:
        shared = gather(actors, [a.share_memory.remote(prefix, p, len(actors)) for p, a in enumerate(actors)])
        paths, unsharded = [replica_paths for replica_paths, _ in shared], shared[0][1]
        if len(actors) > 2:  # the same config everywhere: the same answer
            why += ("; each replica steps its own 1/W of the parameters and optimizer state (sharded update)"
                    if unsharded is None
                    else f"; every replica steps all the parameters ({unsharded})")
        pids = {position: info["pid"] for position, info in enumerate(infos)}
        gather(actors, [a.attach_peers.remote(dict(enumerate(paths)), pids) for a in actors])
        gather(actors, [a.unlink_shared.remote() for a in actors])
    return wire, why


def python_stack(info: dict) -> Optional[str]:
    """The Python stacks of the replica `info` describes, now (py-spy dump, which ray[default]
    installs, run on the replica's node without pausing it); None where that cannot be had."""
    try:
        on_its_node = NodeAffinitySchedulingStrategy(info["node_id"], soft=False)
        return ray.get(_py_spy_dump.options(scheduling_strategy=on_its_node).remote(info["pid"]), timeout=PY_SPY_S)
    except Exception:  # noqa: BLE001  (evidence only: a replica is killed as hung with or without it)
        return None


@ray.remote(num_cpus=0)
def _py_spy_dump(pid: int) -> Optional[str]:
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    done = subprocess.run([py_spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True,
                          timeout=PY_SPY_S)
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def take_errors(refs: Sequence, timeout: float) -> None:
    """Wait up to `timeout` for `refs` and take their errors."""
    refs = list(refs)
    ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001  (expected: these calls met the lost replica)
            pass


def end_hung(members: Sequence[Member], position: int) -> Optional[str]:
    """End the hung replica at `position`: through Ray, and by its pid where it runs on this node
    (ray.kill cannot end a stopped process); its peers stop waiting for it. Returns its Python
    stacks, taken first: evidence of where it hung."""
    member = members[position]
    stack = python_stack(member.info)
    ray.kill(member.actor, no_restart=True)
    kill_if_here(member.info)
    for other, m in enumerate(members):
        if other != position:
            m.actor.abandon.remote(position)
    return stack


def kill_if_here(info: dict) -> None:
    """SIGKILL the replica `info` (what it reported when ready) describes, if it runs on this node."""
    if info["node_id"] == ray.get_runtime_context().get_node_id():
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


class ReplicaTimeout(ReplicaError):
    """Replicas did not answer within the time given."""


def gather(actors: Sequence, refs: Sequence, timeout: float | None = None) -> list:
    """ray.get, with a replica's failure re-raised as a ReplicaError that names it and the cause."""
    try:
        return ray.get(list(refs), timeout=timeout)
    except (RayTaskError, RayActorError) as first:
        error = _root_cause(refs, first)
        lost = isinstance(error, RayActorError)
        raise _replica_error(actors, error, ReplicaLost if lost else ReplicaError) from error
    except GetTimeoutError as e:
        raise ReplicaTimeout(f"replicas did not answer within {timeout:g} s") from e


def _root_cause(refs: Sequence, first: Exception, wait_s: float = 5.0) -> Exception:
    """Of the failures among `refs`, one that caused the others: not a PeerError, if there is one."""
    if not (isinstance(first, RayTaskError) and isinstance(first.cause, PeerError)):
        return first
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
    for ref in ready:
        try:
            ray.get(ref)
        except RayActorError as e:
            return e
        except RayTaskError as e:
            if not isinstance(e.cause, PeerError):
                return e
    return first


def _replica_error(actors: Sequence, error: Exception, kind: type = ReplicaError) -> ReplicaError:
    if isinstance(error, RayActorError):
        reason = _first_line(error)
        if "No module named" in reason:
            reason += (" (the module defining your model, dataset or loss must be importable on every node: "
                       "install it there, or submit with `ray job submit --working-dir .`)")
        return kind(f"{_name(actors, error)} died: {reason}")
    cause = error.cause
    if isinstance(cause, ReplicaError):
        return type(cause)(str(cause))
    return ReplicaError(f"a replica failed: {type(cause).__name__}: {cause}")


def _name(actors: Sequence, error: RayActorError) -> str:
    named = re.search(r"\bname: replica-(\d+)", str(error))  # Ray's message names the dead actor (replica_name)
    if named:
        return f"replica {named.group(1)}"
    ids = [a._actor_id.hex() for a in actors]
    actor_id = getattr(error, "actor_id", None)
    return f"replica {ids.index(actor_id)}" if actor_id in ids else "a replica"


def _first_line(error: Exception) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, RayTaskError):
        return f"{type(cause.cause).__name__}: {cause.cause}"
    text = str(error)
    exit_type = re.search(r"Worker exit type: (\w+)", text)
    if "worker process has died" in text:
        return ("its process died (killed, out of memory, or crashed"
                + (f"; Ray's exit type {exit_type.group(1)})" if exit_type else ")"))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
