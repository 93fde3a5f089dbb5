"""Map-style datasets of (x, y) pairs, and fetching a batch of them by index."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate


class ArrayDataset(Dataset):
    """(x[i], y[i]) pairs backed by numpy arrays.

    numpy, not torch: Ray stores numpy arrays zero-copy, so replicas on one node that get the
    dataset from the object store all read one shared copy.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.tensor(self.x[i]), torch.tensor(self.y[i])

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The collated batch at `indices`: one fancy-index per array, no per-sample loop."""
        idx = np.asarray(indices, dtype=np.int64)
        # Fancy indexing copies, so the tensors are writable even when the arrays are
        # read-only views into Ray's object store.
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])


def fetch(dataset: Dataset, indices: Sequence[int]):
    """Collate the samples at `indices` into one batch, the way DataLoader would."""
    if isinstance(dataset, ArrayDataset):
        return dataset.batch(indices)
    getitems = getattr(dataset, "__getitems__", None)  # torch's batched-fetch protocol
    samples = getitems(list(indices)) if getitems else [dataset[int(i)] for i in indices]
    return default_collate(samples)
