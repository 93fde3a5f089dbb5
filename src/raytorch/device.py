"""Device choice, in one place: what a replica computes on and what it reserves from Ray."""

from __future__ import annotations

import os

import torch

from .config import TrainConfig


def replica_device(name: str) -> torch.device:
    """The torch device for a replica of `name` ('cpu' or 'cuda')."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise RuntimeError(f"device 'cuda' asked for, but this replica sees no GPU (CUDA_VISIBLE_DEVICES={visible})")
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it assigned this actor: index 0 is ours.
    return torch.device("cuda", 0)


def replica_resources(config: TrainConfig) -> dict[str, float]:
    """Ray resources one replica reserves (zero amounts left out, as Ray wants)."""
    wanted = {"CPU": config.cpus_per_replica, "GPU": config.replica_gpus}
    return {name: amount for name, amount in wanted.items() if amount}


def torch_threads(cpus: float) -> int:
    """Intra-op threads for a replica holding `cpus` CPUs: one per whole CPU, at least one."""
    return max(1, int(cpus))
