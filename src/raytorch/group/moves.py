"""Replicas on a node Ray marks as draining, moved before the node goes."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import ray
from ray.util.placement_group import PlacementGroup

from ..compat import rayprivate
from ..core.naming import replica_name
from .records import Bundle, Member
from .spares import Spares, Starting, new_bundle, release

DRAIN_LOOK_S = 2.0  # how often to ask Ray which nodes are draining (their replicas are moved)


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
                on_draining = m.info is not None and m.info.node_id in draining
                if on_draining and m.rank not in self.pending and m.rank not in self.built:
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
                self.gcs = rayprivate.gcs_client(ray.get_runtime_context().gcs_address)
            return rayprivate.draining_nodes(self.gcs, timeout_s=5)
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
