"""Optimizer and learning-rate schedule by name: torch.optim with its defaults except lr."""

from __future__ import annotations

from typing import Iterable

import torch


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    return optimizers[name](params, lr=lr)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int):
    """'cosine' anneals lr to 0 over total_steps optimizer steps; 'constant' keeps it."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
