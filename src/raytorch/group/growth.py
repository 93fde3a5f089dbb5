"""Elastic runs (TrainConfig.max_workers): room for more replicas, sought while the run goes on."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from ray.util.placement_group import PlacementGroup

from ..core.naming import replica_name
from .records import Bundle, Member
from .spares import Starting, new_bundle, release

GROW_LOOK_S = 2.0  # how often to look for room for one more replica


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
