"""Starting the replicas as Ray actors, calling them, and turning Ray's errors into ours."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import TrainConfig
from .device import replica_resources
from .errors import ReplicaError
from .placement import reserve
from .replica import Replica

START_TIMEOUT_S = 300.0


@contextmanager
def replica_group(config: TrainConfig, run_name: str, **replica_args) -> Iterator[tuple[list, list[dict]]]:
    """Reserve room for all replicas, start them, wait until each is built; kill them all on exit.

    Yields the actor handles (index = rank) and what each replica reported on start.
    A start that fails half way still kills what it started and frees the reservation.
    """
    group = reserve(config.workers, replica_resources(config), config.resource_timeout)
    actors: list = []
    try:
        actor_class = ray.remote(Replica)
        for rank in range(config.workers):
            actors.append(actor_class.options(
                num_cpus=config.cpus_per_replica,
                num_gpus=config.replica_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
                name=f"replica-{rank}",
                namespace=run_name,
            ).remote(rank, config, **replica_args))
        infos = gather(actors, [a.ready.remote() for a in actors], timeout=START_TIMEOUT_S)
        yield actors, infos
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)


def gather(actors: Sequence, refs: Sequence, timeout: float | None = None) -> list:
    """ray.get, with a replica's failure re-raised as a ReplicaError that names it."""
    try:
        return ray.get(list(refs), timeout=timeout)
    except RayTaskError as e:
        cause = e.cause
        if isinstance(cause, ReplicaError):
            raise ReplicaError(str(cause)) from e
        raise ReplicaError(f"a replica failed: {type(cause).__name__}: {cause}") from e
    except RayActorError as e:
        reason = _first_line(e)
        if "No module named" in reason:
            reason += (" (the module defining your model, dataset or loss must be importable on every node: "
                       "install it there, or submit with `ray job submit --working-dir .`)")
        raise ReplicaError(f"{_name(actors, e)} died: {reason}") from e
    except GetTimeoutError as e:
        raise ReplicaError(f"replicas did not answer within {timeout:g} s") from e


def _name(actors: Sequence, error: RayActorError) -> str:
    ids = [a._actor_id.hex() for a in actors]
    actor_id = getattr(error, "actor_id", None)
    return f"replica {ids.index(actor_id)}" if actor_id in ids else "a replica"


def _first_line(error: Exception) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, RayTaskError):
        return f"{type(cause.cause).__name__}: {cause.cause}"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
