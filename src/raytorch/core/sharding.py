"""Which samples go to which replica: the data half of the training contract, as pure functions."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of one epoch: a function of seed and epoch only, so any run replays it."""
    if not shuffle:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch))


def steps_per_epoch(size: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of global batches in one epoch."""
    return size // batch_size if drop_last else -(-size // batch_size)


def global_batches(order: torch.Tensor, batch_size: int, drop_last: bool = False) -> list[torch.Tensor]:
    """Global batch k holds positions [k*B, (k+1)*B) of the order; the last may be partial."""
    count = steps_per_epoch(len(order), batch_size, drop_last)
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(count)]


def split_batch(batch: torch.Tensor, parts: int, shares: Optional[Sequence[float]] = None) -> list[torch.Tensor]:
    """Split a global batch into `parts` contiguous pieces, piece r for replica r.

    Even by default: the first len(batch) % parts pieces hold one sample more, and a batch shorter
    than `parts` leaves the last pieces empty (those replicas sit the step out). With `shares`
    (replica speeds), pieces are in proportion to them (see proportional_sizes). Either way the
    batch, its samples and their order are the contract's; only the cut points move.
    """
    if shares is None:
        base, extra = divmod(len(batch), parts)
        sizes = [base + (r < extra) for r in range(parts)]
    else:
        sizes = proportional_sizes(len(batch), shares)
    return list(torch.split(batch, sizes))


def proportional_sizes(n: int, shares: Sequence[float]) -> list[int]:
    """n split in proportion to `shares` (>= 0, some > 0): each gets the floor of its quota, then
    the largest remainders one more (ties to the lower rank). Sums to n; a tiny share may get 0."""
    total = sum(shares)
    if not shares or total <= 0 or min(shares) < 0:
        raise ValueError(f"shares must be >= 0 with a positive sum, got {list(shares)}")
    quotas = [n * share / total for share in shares]
    sizes = [int(q) for q in quotas]
    by_remainder = sorted(range(len(shares)), key=lambda r: (-(quotas[r] - sizes[r]), r))
    for r in by_remainder[:n - sum(sizes)]:
        sizes[r] += 1
    return sizes
