"""What the driver tells each replica per call: its part of each step's batch, and the all-reduce
to apply before it. Pure: no Ray.

A reduce is (weights, routes): weight n_r / n for every replica that had samples, and a route to
each one's gradient. A route is an int, the position of a gradient passed by reference as a call
argument (object-store wire: Ray resolves it, and so orders the call after the one producing it),
or (rank, step), a same-node peer's gradient in shared memory.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .reduce import batch_weights
from .sharding import split_batch

Reduce = tuple[list[float], list]
Step = tuple[np.ndarray, Optional[Reduce], float]  # this replica's samples, the reduce before, its share n_r / n


def plan_steps(batches: Sequence[torch.Tensor], workers: int, carry: Optional[Reduce], wire: str,
               first_step: int, shares: Optional[Sequence[float]] = None
               ) -> tuple[list[list[Step]], list[list[int]], Reduce]:
    """Plan one call per replica covering `batches`, global steps first_step, first_step + 1, ...
    Each batch is cut evenly, or in proportion to `shares` (replica speeds, --split adaptive).

    Returns each replica's steps, each step's part sizes, and the last step's reduce, which the
    next call (or the epoch's final apply) carries.
    """
    if wire == "object_store" and len(batches) != 1:
        raise ValueError("the object-store wire routes by reference to the previous call: one step per call")
    plans: list[list[Step]] = [[] for _ in range(workers)]
    sizes_per_step = []
    for offset, batch in enumerate(batches):
        parts = split_batch(batch, workers, shares)
        sizes = [len(p) for p in parts]
        for plan, part in zip(plans, parts):
            plan.append((part.numpy(), carry, len(part) / len(batch)))
        active = [r for r, n in enumerate(sizes) if n]
        routes = list(range(len(active))) if wire == "object_store" else [(r, first_step + offset) for r in active]
        carry = (batch_weights([sizes[r] for r in active]), routes)
        sizes_per_step.append(sizes)
    return plans, sizes_per_step, carry


# Seconds of steps one call should carry, by wire (see steps_per_call).
CALL_SECONDS = {"shared_memory": 0.1, "collective": 0.4}


def steps_per_call(wire: str, step_time_s: float, most: int = 64) -> int:
    """How many steps one call should carry: enough that Ray's per-call cost is small against the
    call's work. That cost is ~1 ms on an idle core but several where replicas, driver and Ray share
    cores (a straggler's core: 20 ms calls ran 16% slower than 100 ms ones, see docs/performance.md).
    On the collective wire a call crosses nodes and its replicas meet in the group on their own,
    so calls carry more (a loopback cluster of 4 nodes: 0.4 s calls ran 1.2x as many steps a second
    as 0.1 s ones); the adaptive split, re-cut per call, then follows a slowdown a little later.
    The object-store wire needs one step per call."""
    if wire == "object_store" or step_time_s <= 0:
        return 1
    return max(1, min(most, int(CALL_SECONDS[wire] / step_time_s)))
