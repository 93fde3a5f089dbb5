"""Ray's errors made raytorch's: a replica's failure, however Ray reports it, becomes a
ReplicaError (or ReplicaLost, for a replica whose process is gone) that names the replica and the
cause in one line. What is read from the text of Ray's messages is read in compat/."""

from __future__ import annotations

import copy
import re
from typing import Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ..compat import rayprivate
from ..errors import PeerError, ReplicaError, ReplicaLost


class ReplicaTimeout(ReplicaError):
    """Replicas did not answer within the time given."""


def gather(actors: Sequence, refs: Sequence, timeout: float | None = None) -> list:
    """ray.get, with a replica's failure re-raised as a ReplicaError that names it and the cause."""
    try:
        return ray.get(list(refs), timeout=timeout)
    except (RayTaskError, RayActorError) as first:
        error = root_cause(refs, first)
        lost = isinstance(error, RayActorError)
        raise replica_error(actors, error, ReplicaLost if lost else ReplicaError) from error
    except GetTimeoutError as e:
        raise ReplicaTimeout(f"replicas did not answer within {timeout:g} s") from e


def root_cause(refs: Sequence, first: Exception, wait_s: float = 5.0) -> Exception:
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


def replica_error(actors: Sequence, error: Exception, kind: type = ReplicaError) -> ReplicaError:
    """The ReplicaError of `kind` that `error` (Ray's, about one of `actors`) stands for. A
    replica's own ReplicaError comes back as it was raised, with its rank and step."""
    if isinstance(error, RayActorError):
        reason = first_line(error)
        if rayprivate.missing_module(reason):
            reason += (" (the module defining your model, dataset or loss must be importable on every node: "
                       "install it there, or submit with `ray job submit --working-dir .`)")
        rank = dead_rank(actors, error)
        return kind(f"{'a replica' if rank is None else f'replica {rank}'} died: {reason}", rank=rank)
    cause = error.cause
    if isinstance(cause, ReplicaError):
        return copy.copy(cause)  # without Ray's wrapping; its fields kept
    return ReplicaError(f"a replica failed: {type(cause).__name__}: {cause}")


def dead_rank(actors: Sequence, error: RayActorError) -> int | None:
    """The rank of the replica a RayActorError is about: by the name Ray's message gives the dead
    actor (replica-<rank>...), else by its actor id among `actors` (positions); None if neither."""
    named = re.match(r"replica-(\d+)", rayprivate.actor_name(error) or "")
    if named:
        return int(named.group(1))
    ids = [rayprivate.actor_id(a) for a in actors]
    actor_id = getattr(error, "actor_id", None)
    return ids.index(actor_id) if actor_id in ids else None


def first_line(error: Exception) -> str:
    """The cause of an actor's failure in one line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, RayTaskError):
        return f"{type(cause.cause).__name__}: {cause.cause}"
    exit_type = rayprivate.process_died(error)
    if exit_type is not None:
        return "its process died (killed, out of memory, or crashed" + (
            f"; Ray's exit type {exit_type})" if exit_type else ")")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def built_or_dead(error: RayActorError) -> bool:
    """Whether a replica that failed to start died (another try may succeed), not raised in its
    __init__ (no try helps)."""
    return not rayprivate.failed_in_init(error)
