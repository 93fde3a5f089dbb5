"""Optimizer and learning-rate schedule by name: torch.optim and torch.optim.lr_scheduler, with
their defaults except lr and weight decay."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import lr_scheduler


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    return optimizers[name](params, lr=lr, weight_decay=weight_decay)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """One scheduler step per optimizer step, over total_steps:
    'cosine' anneals lr to 0; 'step' divides it by 10 at 50% and again at 75% of the steps after the
    warm-up; 'constant' keeps it. warmup_steps first raise it linearly from lr/warmup_steps to lr."""
    main_steps = max(1, total_steps - warmup_steps)
    if name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps)
    elif name == "step":
        main = lr_scheduler.MultiStepLR(optimizer, milestones=[main_steps // 2, (3 * main_steps) // 4], gamma=0.1)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warmup_steps:
        return main
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0,
                                   total_iters=warmup_steps)
    return lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
