"""Device choice, in one place: what a replica computes on and what it reserves from Ray."""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from typing import Optional, Sequence

import torch

from ..config.schema import TrainConfig
from ..errors import ClusterError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(config: TrainConfig, cluster: dict[str, float]) -> TrainConfig:
    """The config with device 'auto' made 'cuda' or 'cpu' by what the cluster has (Ray's
    cluster_resources()); a ClusterError where 'cuda' (for any replica) is asked of a cluster
    without a GPU."""
    gpus = cluster.get("GPU", 0.0)
    if config.devices is not None:
        on_gpu = [rank for rank, name in enumerate(config.device_names) if name == "cuda"]
        if on_gpu and gpus <= 0:
            raise ClusterError(f"devices {config.devices!r} puts replica(s) {', '.join(map(str, on_gpu))} on cuda, "
                               f"but the cluster has no GPU ({cluster.get('CPU', 0):g} CPU, 0 GPU): name only cpu "
                               f"there, or add GPU nodes")
        return config
    device = config.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus <= 0:
        raise ClusterError(f"device 'cuda' asked for, but the cluster has no GPU ({cluster.get('CPU', 0):g} CPU, "
                           f"0 GPU): use --device cpu (or auto), or add GPU nodes")
    return config if device == config.device else dataclasses.replace(config, device=device)


def autocast(device: torch.device, precision: str):
    """The forward's precision context: torch.autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


# Set for a replica that holds whole GPUs: Ray then leaves CUDA_VISIBLE_DEVICES as the node has
# it, so the replica sees every GPU of its node (NCCL can use NVLink and peer-to-peer copies
# between them) and selects its own by the id Ray assigned, as Ray Train does.
SEE_NODE_GPUS = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def replica_device(name: str, assigned_gpus: Sequence[str] = ()) -> torch.device:
    """The torch device for a replica of `name` ('cpu' or 'cuda'), holding the GPUs of ids
    `assigned_gpus` (Ray's accelerator ids)."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise RuntimeError(f"device 'cuda' asked for, but this replica sees no GPU (CUDA_VISIBLE_DEVICES={visible})")
    if not os.environ.get(SEE_NODE_GPUS) or not assigned_gpus:
        return torch.device("cuda", 0)  # Ray narrowed CUDA_VISIBLE_DEVICES to this replica's GPU(s)
    return torch.device("cuda", gpu_index(assigned_gpus[0], os.environ.get("CUDA_VISIBLE_DEVICES")))


def gpu_index(gpu_id: str, visible: Optional[str]) -> int:
    """CUDA's index, in a process that sees the node's GPUs, of the GPU whose id Ray gives as
    `gpu_id`: its place in CUDA_VISIBLE_DEVICES (`visible`) where the node narrows it, else the id."""
    if not visible:
        return int(gpu_id)
    ids = [entry.strip() for entry in visible.split(",")]
    if gpu_id not in ids:
        raise RuntimeError(f"Ray assigned GPU {gpu_id}, which is not among CUDA_VISIBLE_DEVICES={visible}")
    return ids.index(gpu_id)


# PyTorch's CPU allocator: buffers of 2 MB and more on transparent huge pages (madvised), so a
# model's large tensors and gradients take 2 MB pages, not 4 KiB ones (34 TLB entries for 67 MB,
# not 16,384). Backward of a 4096 x 4096 linear layer in a process set up as a replica is
# (prepare_process), one thread: 13.3 -> 11.4 ms; the whole W = 2 step of that layer, 116-143 ->
# 85-108 ms (docs/performance.md). Read once, when the process first allocates: it has to be in
# the replica's environment from its start. The driver's own value, where set, wins.
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"
HUGE_PAGE_BYTES = 2 * 1024 * 1024  # PyTorch's threshold: smaller buffers never take huge pages


def wants_huge_pages(state: dict) -> bool:
    """Whether a model whose state_dict is `state` holds a tensor that huge pages serve (its
    gradient too): only then is a replica worth its slower start. A replica with an environment of
    its own cannot take one of the workers Ray starts ahead: ~0.7 s more per run here."""
    return any(torch.is_tensor(t) and t.numel() * t.element_size() >= HUGE_PAGE_BYTES for t in state.values())


def replica_env(config: TrainConfig, rank: int, huge_pages: bool = True) -> Optional[dict]:
    """The runtime_env replica `rank` starts with (None: Ray's defaults): PyTorch's huge-page
    allocation (HUGE_PAGES) where `huge_pages` (wants_huge_pages), and for a whole-GPU replica the
    node's GPUs in view (SEE_NODE_GPUS). Ray merges these env_vars with the job's."""
    env = {HUGE_PAGES: os.environ.get(HUGE_PAGES, "1")} if huge_pages else {}
    if config.gpus_of(rank) >= 1:
        env[SEE_NODE_GPUS] = "1"
    return {"env_vars": env} if env else None


def whole_gpus(config: TrainConfig, ranks: Sequence[int]) -> bool:
    """True where every replica of `ranks` computes on a GPU of its own: NCCL can connect them."""
    return all(config.device_of(rank) == "cuda" and config.gpus_of(rank) >= 1 for rank in ranks)


def replica_resources(config: TrainConfig, rank: int) -> dict[str, float]:
    """Ray resources replica `rank` reserves (zero amounts left out, as Ray wants)."""
    wanted = {"CPU": config.cpus_per_replica, "GPU": config.gpus_of(rank)}
    return {name: amount for name, amount in wanted.items() if amount}


def torch_threads(cpus: float) -> int:
    """Intra-op threads for a replica holding `cpus` CPUs: one per whole CPU, at least one."""
    return max(1, int(cpus))
