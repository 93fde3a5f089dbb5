"""A ray.data.Dataset as training data: made map-style once, in the driver, so the run plans it
by index like any Dataset and the contract holds (shuffled per epoch, any W, recovery).

Its blocks are converted to numpy by Ray Data's own tasks (to_numpy_refs, in order), before the
replicas take the cluster's CPUs, and stay in the object store; a sample is (block, row). Each
replica fetches the blocks that hold its samples (zero-copy from the object store on its node)
and keeps them: no replica reads the dataset through the driver, and none runs a pipeline.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch
from torch.utils.data import Dataset


def is_ray_dataset(dataset: Any) -> bool:
    """Whether `dataset` is a ray.data.Dataset (without importing Ray Data for any other)."""
    return type(dataset).__module__.startswith("ray.data") and hasattr(dataset, "to_numpy_refs")


class BlockDataset(Dataset):
    """Rows of a ray.data.Dataset by index: each a dict of column -> tensor (give step_fn, or
    columns "x" and "y" ... as your step reads them)."""

    def __init__(self, dataset: Any):
        from ray.data import DataContext

        context = DataContext.get_current()
        ordered, context.execution_options.preserve_order = context.execution_options.preserve_order, True
        try:  # the blocks in the dataset's order: the same indices mean the same rows on every run
            self.refs = dataset.to_numpy_refs()
        finally:
            context.execution_options.preserve_order = ordered
        sizes = ray.get([_rows.remote(ref) for ref in self.refs])
        self.bounds = np.cumsum([0, *sizes])
        self.blocks: dict[int, dict[str, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {"refs": self.refs, "bounds": self.bounds}  # each process fetches its own blocks

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, blocks={})

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a dataset of {len(self)}")
        b = int(np.searchsorted(self.bounds, index, side="right")) - 1
        if b not in self.blocks:
            self.blocks[b] = ray.get(self.refs[b])
        return {column: _value(values[index - self.bounds[b]]) for column, values in self.blocks[b].items()}


def _value(value: Any) -> Any:
    """A row's value in a column: numbers and arrays as tensors (copies: the object store's are
    read-only), anything else (strings) as it is."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return torch.tensor(value)
    return torch.tensor(value) if isinstance(value, (np.number, np.bool_)) else value


@ray.remote(num_cpus=0)
def _rows(block: dict[str, np.ndarray]) -> int:
    return len(next(iter(block.values()))) if block else 0
