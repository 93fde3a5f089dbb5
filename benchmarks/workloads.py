"""The benchmark's workloads: plain PyTorch models and synthetic data, the same for every system."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raytorch.data.datasets import ArrayDataset


def seed_linear() -> nn.Module:
    return nn.Linear(1, 1)


def mlp_784() -> nn.Module:
    """784-1024-1024-10: 1.86 M parameters."""
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def mlp_25m() -> nn.Module:
    """784-4096-4096-1024-10: 24.2 M parameters, bandwidth-bound on the all-reduce."""
    return nn.Sequential(nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))


def mlp_17mb() -> nn.Module:
    """784-4096-256-10: 4.27 M parameters, 17 MB of gradient (the multi-node case)."""
    return nn.Sequential(nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 256), nn.ReLU(), nn.Linear(256, 10))


def linear_data(n: int) -> ArrayDataset:
    x = np.random.default_rng(0).integers(0, 100, size=(n, 1)).astype(np.float32)
    return ArrayDataset(x, 2 * x + 1)


def image_data(n: int) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.normal(size=(n, 784)).astype(np.float32), rng.integers(0, 10, n))


@dataclass(frozen=True)
class Workload:
    name: str
    model_fn: Callable[[], nn.Module]
    data_fn: Callable[[int], ArrayDataset]
    loss_fn: Callable
    batch_size: int
    steps: int
    """Measured steps; as many again run first as warm-up."""
    lr: float

    def params(self) -> int:
        return sum(p.numel() for p in self.model_fn().parameters())


WORKLOADS = {
    "linear": Workload("linear", seed_linear, linear_data, F.mse_loss, batch_size=32, steps=2000, lr=1e-5),
    "mlp": Workload("mlp", mlp_784, image_data, F.cross_entropy, batch_size=256, steps=120, lr=0.01),
    "25m": Workload("25m", mlp_25m, image_data, F.cross_entropy, batch_size=64, steps=12, lr=0.01),
    "17mb": Workload("17mb", mlp_17mb, image_data, F.cross_entropy, batch_size=16, steps=40, lr=0.01),
}


def batches(workload: Workload, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole stream of samples a run of `steps` global steps uses, in order."""
    data = workload.data_fn(steps * workload.batch_size)
    return data.batch(np.arange(len(data)))
