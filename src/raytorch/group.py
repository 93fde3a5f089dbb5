"""The live replicas of a run: starting them as Ray actors, calling them, replacing the lost, and
turning Ray's errors into ours."""

from __future__ import annotations

import os
import re
import signal
from contextlib import contextmanager
from typing import Iterator, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import TrainConfig
from .device import replica_resources
from .errors import ClusterError, PeerError, ReplicaError
from .placement import reserve
from .replica import Replica

START_TIMEOUT_S = 300.0
PING_TIMEOUT_S = 10.0  # a replica's health thread answers at once unless its process is stopped


class ReplicaLost(ReplicaError):
    """A replica died or hung: the driver replaces it and redoes the interrupted step."""


class ReplicaGroup:
    """The replicas in wire order (position p holds `actors[p]`, replica-`ranks[p]`, in placement
    bundle `bundles[p]`), the idle spares, and how gradients travel between the replicas."""

    def __init__(self, config: TrainConfig, run_name: str, replica_args: dict):
        self.config, self.run_name, self.replica_args = config, run_name, replica_args
        self.actor_class = ray.remote(concurrency_groups={"health": 1})(Replica)
        bundles = [replica_resources(config, rank) for rank in range(config.workers + config.spares)]
        self.placement = reserve(bundles, config.placement, config.resource_timeout)
        self.actors: list = []
        self.ranks: list[int] = []
        self.bundles: list[int] = []
        self.infos: list[dict] = []
        self.spares: list[tuple] = []  # (actor, its ready() ref, its bundle, its name), oldest first
        self.wire = "object_store"
        self.generation = 0  # bumped by every change of membership: fresh shared-memory names

    def start(self) -> list[dict]:
        """Start every replica and wait until each is built; returns what each reported. Spares
        start beside them and are used once built."""
        workers = self.config.workers
        self.actors = [self._create(rank, rank, f"replica-{rank}") for rank in range(workers)]
        self.ranks, self.bundles = list(range(workers)), list(range(workers))
        for bundle in range(workers, workers + self.config.spares):
            self._add_spare(bundle)
        self.infos = gather(self.actors, [a.ready.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        self.rewire()
        return self.described()

    def described(self) -> list[dict]:
        return [dict(info, wire=self.wire) for info in self.infos]

    def _create(self, rank: int, bundle: int, name: str):
        return self.actor_class.options(
            num_cpus=self.config.cpus_per_replica,
            num_gpus=self.config.gpus_of(rank),
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=bundle),
            name=name,
            namespace=self.run_name,
        ).remote(rank, self.config, run_name=self.run_name, **self.replica_args)

    def _add_spare(self, bundle: int) -> None:
        name = f"spare-{bundle}" + (f".{self.generation}" if self.generation else "")
        actor = self._create(bundle, bundle, name)
        self.spares.append((actor, actor.ready.remote(), bundle, name))

    def _take_spare(self, rank: int):
        """A built spare, now replica `rank`: (actor, info, bundle, name); None if none is ready."""
        for spare in list(self.spares):
            actor, ready_ref, bundle, name = spare
            if not ray.wait([ready_ref], timeout=0)[0]:
                continue  # still starting
            self.spares.remove(spare)
            try:
                ray.get(actor.adopt.remote(rank), timeout=PING_TIMEOUT_S)
                return actor, dict(ray.get(ready_ref), rank=rank), bundle, name
            except (RayActorError, RayTaskError, GetTimeoutError):
                ray.kill(actor, no_restart=True)  # lost with its node, or broken: try the next
        return None

    def rewire(self) -> None:
        """Pick how gradients travel (see TrainConfig.reduction) and set it up afresh."""
        self.wire = connect_wire(self.config.reduction, self.actors, self.infos, f"{self.run_name}-g{self.generation}")

    def get(self, refs: Sequence, timeout: float | None = None):
        """gather(), where a replica that stops answering for step_timeout is found and killed:
        ReplicaLost then, as for one that died."""
        limit = self.config.step_timeout if timeout is None else timeout
        while True:
            try:
                return gather(self.actors, refs, timeout=limit)
            except ReplicaTimeout as timed_out:
                hung = self.hung()
                if hung:
                    for position, _ in hung:
                        self.kill(position)
                    names = ", ".join(f"replica-{self.ranks[p]} ({why})" for p, why in hung)
                    raise ReplicaLost(f"{names}: treated as dead after step_timeout "
                                      f"{self.config.step_timeout:g} s") from timed_out
                # every replica answers and none is stuck in a step: slow, not hung; wait on

    def hung(self) -> list[tuple[int, str]]:
        """Positions of replicas that do not answer a ping, or have computed one step for longer
        than step_timeout; with the reason."""
        return self._health()[0]

    def dead(self) -> list[int]:
        """Positions of the replicas that are gone; a hung one is killed and counted with them."""
        hung, gone = self._health()
        for position, _ in hung:
            self.kill(position)
        return sorted(gone + [position for position, _ in hung])

    def _health(self) -> tuple[list[tuple[int, str]], list[int]]:
        """One ping to every replica: (hung positions with the reason, dead positions)."""
        pings = [a.ping.remote() for a in self.actors]
        wait = min(PING_TIMEOUT_S, self.config.step_timeout)
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
            if computing is not None and computing > self.config.step_timeout:
                hung.append((position, f"one step computing for {computing:.0f} s"))
        return hung, gone

    def kill(self, position: int) -> None:
        """End a hung replica: through Ray, and by its pid where it runs on this node (ray.kill
        cannot end a stopped process); its peers stop waiting for it."""
        ray.kill(self.actors[position], no_restart=True)
        info = self.infos[position]
        if info["node_id"] == ray.get_runtime_context().get_node_id():
            try:
                os.kill(info["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        for other, actor in enumerate(self.actors):
            if other != position:
                actor.abandon.remote(position)

    def replace(self, lost: list[int]) -> tuple[list[int], list[int], list[str]]:
        """Put a ready spare in the place of each lost position, or else start a replacement in its
        bundle (Ray re-places a bundle whose node died, where it finds room) and give it
        replace_timeout; a spare's freed bundle gets a new spare, started in the background.
        Returns the ranks replaced, the ranks dropped and the spares used; the group then holds
        the survivors and the replacements, by rank."""
        self.generation += 1
        members = {rank: (actor, info, bundle) for p, (rank, actor, info, bundle)
                   in enumerate(zip(self.ranks, self.actors, self.infos, self.bundles)) if p not in lost}
        replaced, dropped, spares_used, started = [], [], [], {}
        for p in lost:
            rank, bundle = self.ranks[p], self.bundles[p]
            spare = self._take_spare(rank)
            if spare is not None:
                actor, info, spare_bundle, name = spare
                members[rank] = (actor, info, spare_bundle)
                replaced.append(rank)
                spares_used.append(name)
                self._add_spare(bundle)
            else:
                started[rank] = (self._create(rank, bundle, f"replica-{rank}.{self.generation}"), bundle)
        ready_refs = {rank: actor.ready.remote() for rank, (actor, _) in started.items()}
        ready, _ = ray.wait(list(ready_refs.values()), num_returns=len(ready_refs),
                            timeout=self.config.replace_timeout)
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
                members[rank] = (actor, info, bundle)
                replaced.append(rank)
        self.ranks = sorted(members)
        self.actors = [members[rank][0] for rank in self.ranks]
        self.infos = [members[rank][1] for rank in self.ranks]
        self.bundles = [members[rank][2] for rank in self.ranks]
        return sorted(replaced), dropped, spares_used

    def close(self) -> None:
        for actor in self.actors + [spare[0] for spare in self.spares]:
            ray.kill(actor)
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


def connect_wire(reduction: str, actors: list, infos: list[dict], prefix: str) -> str:
    """Pick how gradients travel (see TrainConfig.reduction) and set it up; returns its name."""
    nodes = {info["node_id"] for info in infos}
    possible = len(nodes) == 1 and all(info["shared_memory"] for info in infos)
    if reduction == "shared_memory" and not possible:
        raise ClusterError(f"reduction 'shared_memory' needs all replicas on one x86 node with /dev/shm; they are "
                           f"on {len(nodes)} node(s): use reduction 'auto' or 'object_store'")
    if reduction == "object_store" or not possible:
        gather(actors, [a.use_object_store.remote() for a in actors])
        return "object_store"
    paths = gather(actors, [a.share_memory.remote(prefix, position) for position, a in enumerate(actors)])
    pids = {position: info["pid"] for position, info in enumerate(infos)}
    gather(actors, [a.attach_peers.remote(dict(enumerate(paths)), pids) for a in actors])
    gather(actors, [a.unlink_shared.remote() for a in actors])
    return "shared_memory"


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
    named = re.search(r"\bname: replica-(\d+)", str(error))  # Ray's message names the dead actor
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
