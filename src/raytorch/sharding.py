"""Which samples go to which replica: the data half of the training contract, as pure functions."""

from __future__ import annotations

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


def split_batch(batch: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Split a global batch into `parts` contiguous, near-equal pieces, piece r for replica r.

    The first len(batch) % parts pieces hold one sample more. A batch shorter than `parts`
    leaves the last pieces empty: those replicas sit the step out.
    """
    base, extra = divmod(len(batch), parts)
    sizes = [base + (r < extra) for r in range(parts)]
    return list(torch.split(batch, sizes))
