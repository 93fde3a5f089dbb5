"""Replicas started ahead or on the side: idle spares that take a lost replica's place at once,
replicas starting in the background (to join, or to stand in), and replacements awaited."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from .health import PING_TIMEOUT_S
from .records import Bundle, Member


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
            if not ray.wait([spare.ready], timeout=0)[0] or ray.get(spare.ready).node_id in avoid:
                continue  # still starting, or on a node about to go
            self.idle.remove(spare)
            try:
                ray.get(spare.actor.adopt.remote(rank), timeout=PING_TIMEOUT_S)
                return Member(spare.actor, rank, spare.bundle, ray.get(spare.ready).as_rank(rank)), spare.name
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
