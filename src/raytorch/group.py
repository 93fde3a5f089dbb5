"""Starting the replicas as Ray actors, calling them, and turning Ray's errors into ours."""

from __future__ import annotations

import re
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


@contextmanager
def replica_group(config: TrainConfig, run_name: str, **replica_args) -> Iterator[tuple[list, list[dict]]]:
    """Reserve room for all replicas, start them, wait until each is built; kill them all on exit.

    Yields the actor handles (index = rank) and what each replica reported on start.
    A start that fails half way still kills what it started and frees the reservation.
    """
    group = reserve(config.workers, replica_resources(config), config.placement, config.resource_timeout)
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
        wire = connect_wire(config.reduction, actors, infos, run_name)
        yield actors, [dict(info, wire=wire) for info in infos]
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)


def connect_wire(reduction: str, actors: list, infos: list[dict], run_name: str) -> str:
    """Pick how gradients travel (see TrainConfig.reduction) and set it up; returns its name."""
    nodes = {info["node_id"] for info in infos}
    possible = len(nodes) == 1 and all(info["shared_memory"] for info in infos)
    if reduction == "shared_memory" and not possible:
        raise ClusterError(f"reduction 'shared_memory' needs all replicas on one x86 node with /dev/shm; they are "
                           f"on {len(nodes)} node(s): use reduction 'auto' or 'object_store'")
    if reduction == "object_store" or not possible:
        return "object_store"
    paths = gather(actors, [a.share_memory.remote(run_name) for a in actors])
    pids = {info["rank"]: info["pid"] for info in infos}
    gather(actors, [a.attach_peers.remote(dict(enumerate(paths)), pids) for a in actors])
    gather(actors, [a.unlink_shared.remote() for a in actors])
    return "shared_memory"


def gather(actors: Sequence, refs: Sequence, timeout: float | None = None) -> list:
    """ray.get, with a replica's failure re-raised as a ReplicaError that names it and the cause."""
    try:
        return ray.get(list(refs), timeout=timeout)
    except (RayTaskError, RayActorError) as first:
        error = _root_cause(refs, first)
        raise _replica_error(actors, error) from error
    except GetTimeoutError as e:
        raise ReplicaError(f"replicas did not answer within {timeout:g} s") from e


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


def _replica_error(actors: Sequence, error: Exception) -> ReplicaError:
    if isinstance(error, RayActorError):
        reason = _first_line(error)
        if "No module named" in reason:
            reason += (" (the module defining your model, dataset or loss must be importable on every node: "
                       "install it there, or submit with `ray job submit --working-dir .`)")
        return ReplicaError(f"{_name(actors, error)} died: {reason}")
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
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
