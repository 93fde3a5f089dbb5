"""Models with dropout, and one that draws a buffer in __init__, importable by replicas (tests/ is
on their PYTHONPATH): the contract's cases for the randomness of the models people bring."""

import numpy as np
import torch
from torch import nn

from raytorch.data.datasets import ArrayDataset


def dropout_mlp() -> nn.Module:
    """An MLP with nn.Dropout and AlphaDropout between its layers, as MNIST's Net has."""
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 64), nn.SELU(),
                         nn.AlphaDropout(0.2), nn.Linear(64, 4))


class SequenceClassifier(nn.Module):
    """A transformer encoder over (batch, sequence, features) with dropout 0.2 everywhere
    (attention weights included), mean-pooled into classes."""

    def __init__(self, features: int = 4, width: int = 16, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=32, dropout=0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def sequence_data(size: int = 150, seed: int = 0) -> ArrayDataset:
    """Sequences of 6 steps of 4 features, labelled by a fixed teacher on their mean."""
    x = np.random.default_rng(seed).normal(size=(size, 6, 4)).astype(np.float32)
    teacher = np.random.default_rng(54321).normal(size=(4, 3))
    return ArrayDataset(x, (x.mean(axis=1) @ teacher).argmax(axis=1).astype(np.int64))


class RandomFeatures(nn.Module):
    """Random features drawn in __init__ into a buffer outside the state_dict (persistent=False):
    what it trains depends on every process drawing the same features."""

    def __init__(self):
        super().__init__()
        self.register_buffer("features", torch.randn(16, 32), persistent=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(x @ self.features))
