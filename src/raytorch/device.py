"""Device choice, in one place: what a replica computes on and what it reserves from Ray."""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext

import torch

from .config import TrainConfig
from .errors import ClusterError

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


def replica_device(name: str) -> torch.device:
    """The torch device for a replica of `name` ('cpu' or 'cuda')."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise RuntimeError(f"device 'cuda' asked for, but this replica sees no GPU (CUDA_VISIBLE_DEVICES={visible})")
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it assigned this actor: index 0 is ours.
    return torch.device("cuda", 0)


def replica_resources(config: TrainConfig, rank: int) -> dict[str, float]:
    """Ray resources replica `rank` reserves (zero amounts left out, as Ray wants)."""
    wanted = {"CPU": config.cpus_per_replica, "GPU": config.gpus_of(rank)}
    return {name: amount for name, amount in wanted.items() if amount}


def torch_threads(cpus: float) -> int:
    """Intra-op threads for a replica holding `cpus` CPUs: one per whole CPU, at least one."""
    return max(1, int(cpus))
