"""How replica gradients and losses combine: the math half of the training contract."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def batch_weights(counts: Sequence[int]) -> list[float]:
    """Weight of each replica's local mean: its share of the global batch's samples.

    Summing n_r/n times the gradient of replica r's mean loss gives the gradient of the
    mean loss over the whole batch, whatever the split.
    """
    total = sum(counts)
    if total <= 0:
        raise ValueError(f"a global batch needs at least one sample, got counts {list(counts)}")
    return [n / total for n in counts]


def weighted_sum(arrays: Sequence[np.ndarray], weights: Sequence[float], out: np.ndarray,
                 scratch: np.ndarray) -> np.ndarray:
    """out = sum_i weights[i] * arrays[i], in a fixed order so every replica gets the same bits.

    `arrays` may be read-only (zero-copy views into Ray's object store); `scratch` is a buffer
    of out's shape that saves a temporary per term.
    """
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(f"need one weight per array and at least one array, got {len(arrays)} and {len(weights)}")
    np.multiply(arrays[0], out.dtype.type(weights[0]), out=out)
    for array, weight in zip(arrays[1:], weights[1:]):
        np.multiply(array, out.dtype.type(weight), out=scratch)
        out += scratch
    return out


def weighted_mean(values: Sequence[float], counts: Sequence[int]) -> float:
    """Sample-weighted mean of per-part mean values (losses): sum n_r v_r / sum n_r."""
    total = sum(counts)
    return sum(v * n for v, n in zip(values, counts)) / total
