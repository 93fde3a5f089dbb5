"""The choice of wire (TrainConfig.reduction 'auto' and its reasons, in words) and the checks of
/dev/shm it rests on: whether the shared-memory wire can run here, and whether it has room."""

from __future__ import annotations

import os
import platform
from typing import Optional, Protocol, Sequence

from .shared_memory import SHM_DIR


def choose(reduction: str, nodes: int, shared_memory: bool, whole_gpus: bool = False, group: Optional[str] = None,
           short: Optional[str] = None) -> tuple[str, str]:
    """The wire for TrainConfig.reduction `reduction` with the replicas on `nodes` nodes (and /dev/shm
    usable by all where `shared_memory`, unless `short` says why it is too small; each on a GPU of
    its own where `whole_gpus`; `group`: why the run needs a process group, where it does), and why, in
    words. ValueError where shared memory is asked for and cannot work."""
    local = nodes == 1 and shared_memory and short is None
    if reduction == "shared_memory" and not local:
        where = short if nodes == 1 and shared_memory else f"they are on {nodes} node(s)"
        raise ValueError(f"reduction 'shared_memory' needs all replicas on one x86 node with room in /dev/shm; "
                         f"{where}: use reduction 'auto', 'collective' or 'object_store'")
    if reduction != "auto":
        return reduction, "as asked" + (" (NCCL: every replica holds a whole GPU)" if whole_gpus
                                        and reduction == "collective" else "")
    if whole_gpus:
        return "collective", "every replica holds a whole GPU: NCCL all-reduces the gradients on the GPUs"
    if group:
        return "collective", f"{group}: they travel on a gloo process group"
    if local:
        return "shared_memory", "all replicas on one node read each other's gradients in /dev/shm"
    where = f"replicas on {nodes} nodes" if nodes > 1 else short or "no shared memory usable here"
    return "collective", f"{where}: a gloo ring all-reduce among them, ~2 gradients a replica a step"


def shared_memory_room() -> int:
    """Bytes free in /dev/shm here (0 where there is none): what the shared-memory wire may map."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


class ShmRoom(Protocol):
    """What a replica reports of its /dev/shm and of what its shared-memory wire would need
    (replica/replies.py's ReplicaInfo has these fields)."""

    grad_bytes: int
    shared_buffers: int
    shm_free: int


def shared_memory_shortfall(infos: Sequence[ShmRoom]) -> Optional[str]:
    """Why /dev/shm cannot hold the shared-memory wire of the replicas `infos` describe (Replica.ready:
    its free bytes, the gradient's bytes, and the model-sized buffers a sharded update would add
    past two replicas), in words; None where it can. The files are sparse: past the room, a replica
    would die of SIGBUS when it first writes there, not fail at the start."""
    world, grad = len(infos), max(info.grad_bytes for info in infos)
    need = world * (2 * grad + 2 * -(-grad // world)) + (max(info.shared_buffers for info in infos) * grad
                                                        if world > 2 else 0)
    room = min(info.shm_free for info in infos)
    if need <= room:
        return None
    return (f"/dev/shm has {room / 2**20:,.0f} MiB free and the shared-memory wire of {world} replicas needs "
            f"~{need / 2**20:,.0f} MiB (a container's is often 64 MiB: docker run --shm-size)")


def shared_memory_available() -> bool:
    """True where replicas on one node can use SharedMemoryWire (see its note on x86)."""
    return platform.machine() in ("x86_64", "AMD64") and SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)
