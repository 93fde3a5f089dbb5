"""The group's records of its replicas: where each lives, and what a replacement did."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from ray.util.placement_group import PlacementGroup

from ..replica.replies import ReplicaInfo

Bundle = tuple[PlacementGroup, int]  # a placement group and the index of one of its bundles


class Member(NamedTuple):
    """One live replica: its actor, its rank (replica-<rank> for good), its placement bundle, and
    where it runs (what its ready() answered; None until it has)."""

    actor: Any
    rank: int
    bundle: Bundle
    info: Optional[ReplicaInfo]


class Replacement(NamedTuple):
    """What replace() did: ranks replaced, ranks dropped (no room in time), spares used (by name)."""

    replaced: list[int]
    dropped: list[int]
    spares_used: list[str]
