"""How replica gradients and losses combine: the math half of the training contract."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch


def batch_weights(counts: Sequence[int]) -> list[float]:
    """Weight of each replica's local mean: its share of the global batch's samples.

    Summing n_r/n times the gradient of replica r's mean loss gives the gradient of the
    mean loss over the whole batch, whatever the split.
    """
    total = sum(counts)
    if total <= 0:
        raise ValueError(f"a global batch needs at least one sample, got counts {list(counts)}")
    return [n / total for n in counts]


def weighted_sum(arrays: Sequence[np.ndarray], weights: Sequence[float], out: torch.Tensor) -> torch.Tensor:
    """out = sum_i weights[i] * arrays[i], in a fixed order so every replica gets the same bits.

    `arrays` may be read-only (zero-copy views into Ray's object store or a peer's shared memory):
    they are only read. No temporary the size of `out` is made.
    """
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(f"need one weight per array and at least one array, got {len(arrays)} and {len(weights)}")
    with warnings.catch_warnings():  # torch warns that read-only arrays make read-only tensors: we only read
        warnings.simplefilter("ignore", UserWarning)
        terms = [torch.from_numpy(np.asarray(a)) for a in arrays]
    torch.mul(terms[0], weights[0], out=out)
    for term, weight in zip(terms[1:], weights[1:]):
        out.add_(term, alpha=weight)
    return out


def weighted_mean(values: Sequence[float], counts: Sequence[int]) -> float:
    """Sample-weighted mean of per-part mean values (losses): sum n_r v_r / sum n_r."""
    total = sum(counts)
    return sum(v * n for v, n in zip(values, counts)) / total


def chunk_bounds(numel: int, parts: int, align: int = 64) -> list[tuple[int, int]]:
    """[lo, hi) of each part's contiguous chunk of a flat buffer of `numel` elements, in order.

    Near-equal in whole blocks of `align` elements (the last chunk takes the remainder; with fewer
    blocks than parts, the last chunks are empty). Starting every chunk on a block boundary keeps
    the vectorized sum's lanes where one pass over the whole buffer has them, so a sum done chunk
    by chunk has the same bits as one done at once.
    """
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    blocks = -(-numel // align)
    base, extra = divmod(blocks, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = min(numel, start + (base + (part < extra)) * align)
        bounds.append((start, end))
        start = end
    return bounds
