"""Starting replicas as Ray actors: the actor class, the arguments every replica shares (in the
object store once), the resources and environment of each, and waiting until they are built."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config.schema import TrainConfig
from ..replica.actor import Replica
from ..replica.device import replica_env, wants_huge_pages
from ..replica.replies import ReplicaInfo
from .errors import built_or_dead, gather, replica_error
from .records import Bundle

START_TIMEOUT_S = 300.0
SHARED_ARGS = ("init_state", "train_set", "eval_set")  # put in the object store once, read by every replica


class Launcher:
    """Starts Replica actors of one run, each in a placement bundle, named and in the run's namespace."""

    def __init__(self, config: TrainConfig, run_name: str, replica_args: dict):
        self.config, self.run_name = config, run_name
        self.huge_pages = wants_huge_pages(replica_args.get("init_state") or {})
        # the big arguments go to the object store once: every replica (and replacement) reads them there
        self.replica_args = {name: ray.put(value) if name in SHARED_ARGS and value is not None else value
                             for name, value in replica_args.items()}
        self.actor_class = ray.remote(concurrency_groups={"health": 1})(Replica)

    def create(self, rank: int, bundle: Bundle, name: str) -> Any:
        """Start replica `rank` in `bundle` as the actor `name` (its start goes on in the background)."""
        return self.actor_class.options(
            num_cpus=self.config.cpus_per_replica,
            num_gpus=self.config.gpus_of(rank),
            scheduling_strategy=PlacementGroupSchedulingStrategy(bundle[0], placement_group_bundle_index=bundle[1]),
            name=name,
            namespace=self.run_name,
            runtime_env=replica_env(self.config, rank, self.huge_pages),
        ).remote(rank, self.config, run_name=self.run_name, **self.replica_args)


def built(actors: Sequence, refs: Sequence) -> tuple[dict[int, ReplicaInfo], list[int], Optional[Exception]]:
    """Wait for replicas' ready() calls `refs`: what each built one reported (by position), the
    positions of those whose process died while starting, and one such death. A replica whose
    __init__ raised (no retry helps) or that is not built within START_TIMEOUT_S: its ReplicaError."""
    ray.wait(list(refs), num_returns=len(refs), timeout=START_TIMEOUT_S)
    infos, dead, died = {}, [], None
    for position, ref in enumerate(refs):
        try:
            infos[position] = ray.get(ref, timeout=0)
        except RayActorError as e:
            if not built_or_dead(e):
                raise replica_error(actors, e) from e
            dead.append(position)
            died = e
        except (RayTaskError, GetTimeoutError):
            gather(actors, refs, timeout=START_TIMEOUT_S)  # raises it as the replica's error
    return infos, dead, died
