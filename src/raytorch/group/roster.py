"""The roster of a run's replicas: who the live members are (by rank, in wire order), the idle
spares, the replicas starting to join (elastic) or to stand in for one on a draining node, and the
membership generation. It starts and ends replicas; talking to them is the group's (group.py)."""

from __future__ import annotations

from typing import Sequence

import ray
from ray.util.placement_group import remove_placement_group

from ..config.schema import TrainConfig
from ..core.naming import replica_name
from ..replica.device import replica_resources
from .growth import Growth
from .launch import Launcher
from .moves import Moves
from .placement import reserve_replicas
from .records import Member, Replacement
from .spares import Spares, await_started


class Roster:
    """The live members in wire order (position p holds `members[p]`) and the replicas beside them."""

    def __init__(self, config: TrainConfig, launcher: Launcher):
        self.config, self.launcher = config, launcher
        bundles = [replica_resources(config, rank) for rank in range(config.workers + config.spares)]
        # elastic (max_workers): as many as fit now, at least workers; room that comes later: growth
        self.reservation = reserve_replicas(bundles, config.workers, config.max_workers or config.workers,
                                            config.placement, config.resource_timeout)
        self.placement, self.workers = self.reservation.group, self.reservation.workers
        create = launcher.create
        self.growth = (Growth(create, bundles[0], config.max_workers, self.workers + config.spares)
                       if config.max_workers else None)
        self.spares = Spares(create)
        self.moves = Moves(create, self.spares, bundles[0])  # off nodes that are draining
        self.members: list[Member] = []
        self.generation = 0  # bumped by every change of membership: fresh shared-memory names

    def launch(self) -> None:
        """Start every replica (a member at once, so close() ends a start that fails), and the
        spares beside them."""
        first = self.reservation.first  # 0, or 1 in a Tune trial's placement group (bundle 0: its driver)
        self.members = [Member(self.launcher.create(rank, (self.placement, first + rank), replica_name(rank)), rank,
                               (self.placement, first + rank), None) for rank in range(self.workers)]
        for index in range(self.workers, self.workers + self.config.spares):
            self.spares.add((self.placement, first + index), self.generation)

    def replace(self, lost: Sequence[int], drop: Sequence[int] = ()) -> Replacement:
        """Put a ready spare in the place of each lost rank but those in `drop`, or else start a
        replacement in its bundle (Ray re-places a bundle whose node died, where it finds room) and
        give it replace_timeout; a spare's freed bundle gets a new spare, started in the background.
        The group then holds the survivors and the replacements, by rank."""
        self.generation += 1
        members = {m.rank: m for m in self.members if m.rank not in lost}
        wanted = [m for m in self.members if m.rank in lost and m.rank not in drop]
        taken, spares_used, left = self.spares.stand_in(wanted, self.generation)
        started = {m.rank: (self.launcher.create(m.rank, m.bundle, f"{replica_name(m.rank)}.{self.generation}"),
                            m.bundle) for m in left}
        ready, dropped = await_started(started, self.config.replace_timeout)
        if self.growth is not None:  # elastic: a dropped replica's bundle is where the run may grow again
            self.growth.vacant += [started[rank][1] for rank in dropped]
        members.update(taken)
        members.update(ready)
        self.members = [members[rank] for rank in sorted(members)]
        return Replacement(sorted([*taken, *ready]), sorted([*dropped, *drop]), spares_used)

    def joining(self) -> bool:
        """Elastic runs: whether a replica is built and waits to join (polled between calls; never
        blocks: it may start one where room may come)."""
        return self.growth is not None and self.growth.ready(len(self.members))

    def take_joiner(self) -> Member:
        """The replica waiting to join, a member from now on (the highest rank: last in wire order)."""
        member, self.growth.built = self.growth.built, None
        self.members.append(member)
        self.generation += 1
        return member

    def moving(self) -> bool:
        """Whether a stand-in for a replica on a draining node is built (polled between calls)."""
        return self.moves.ready(self.members, self.generation)

    def take_moves(self) -> dict[int, tuple[Member, Member]]:
        """The built stand-ins, each now a member in the place of the replica it stands in for:
        by rank, (the stand-in, the replica it replaces: still alive, for its state)."""
        moved = {}
        ranks = [m.rank for m in self.members]
        for rank, member in self.moves.take(ranks).items():
            position = ranks.index(rank)
            moved[rank] = member, self.members[position]
            self.members[position] = member
        self.generation += 1
        return moved

    def close(self) -> None:
        """End every member, spare and starting replica; free the reservation."""
        self.moves.close()
        if self.growth is not None:
            self.growth.close()
        for actor in [m.actor for m in self.members] + [spare.actor for spare in self.spares.idle]:
            ray.kill(actor)
        if self.reservation.owned:  # not a Tune trial's: Tune removes its own
            remove_placement_group(self.placement)
