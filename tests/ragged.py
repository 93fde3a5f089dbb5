"""Sequences of different lengths, a collate that pads them, and a model that pools over the real
steps only: importable by replicas (tests/ is on their PYTHONPATH)."""

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence


class RaggedSequences(torch.utils.data.Dataset):
    """(a sequence of 2 to 9 steps of 4 features, its class): no two lengths need agree."""

    def __init__(self, size: int = 90, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.items = [rng.normal(size=(rng.integers(2, 10), 4)).astype(np.float32) for _ in range(size)]
        teacher = np.random.default_rng(777).normal(size=(4, 3))
        self.labels = [int((x.mean(axis=0) @ teacher).argmax()) for x in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return torch.from_numpy(self.items[i]), self.labels[i]


def pad(items):
    """((the sequences padded to the longest of the part, their lengths), labels)."""
    sequences, labels = zip(*items)
    lengths = torch.tensor([len(s) for s in sequences])
    return (pad_sequence(list(sequences), batch_first=True), lengths), torch.tensor(labels)


class MeanOverSteps(nn.Module):
    """Each step through a layer, averaged over the sequence's own steps (padding left out)."""

    def __init__(self):
        super().__init__()
        self.step, self.head = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, batch):
        padded, lengths = batch
        real = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        pooled = (torch.tanh(self.step(padded)) * real).sum(1) / lengths[:, None]
        return self.head(pooled)
