"""The built-in models, datasets and losses the CLI can name (their names: config/recipes.py, kept equal
by tests/test_config.py). Plain PyTorch: no Ray, no devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import ArrayDataset


def linear(in_features: int = 1, out_features: int = 1) -> nn.Module:
    """y = w x + b: the seed note's model for 1 -> 1."""
    return nn.Linear(in_features, out_features)


def mlp(in_features: int = 1, out_features: int = 1, hidden: int = 64) -> nn.Module:
    """Two hidden ReLU layers."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, out_features),
    )


def linear_data(size: int, seed: int) -> ArrayDataset:
    """The seed note's data: integer x drawn from [0, 100), y = 2x + 1."""
    x = np.random.default_rng(seed).integers(0, 100, size=(size, 1)).astype(np.float32)
    return ArrayDataset(x, 2 * x + 1)


def classification_data(size: int, seed: int, features: int = 16, classes: int = 4) -> ArrayDataset:
    """Gaussian inputs labelled by a fixed random linear teacher (same teacher for every seed)."""
    teacher = np.random.default_rng(12345).normal(size=(features, classes))
    x = np.random.default_rng(seed).normal(size=(size, features)).astype(np.float32)
    return ArrayDataset(x, (x @ teacher).argmax(axis=1).astype(np.int64))


def digits_data(part: str) -> ArrayDataset:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes; shipped inside scikit-learn,
    no download), pixels scaled to [0, 1], flattened to 64 features; a fixed 80/20 split: 'train'
    1,437 images, 'eval' 360."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(20240601).permutation(len(digits.target))
    cut = int(0.8 * len(order))
    chosen = order[:cut] if part == "train" else order[cut:]
    return ArrayDataset((digits.data[chosen] / 16.0).astype(np.float32), digits.target[chosen].astype(np.int64))


@dataclass(frozen=True)
class Task:
    """A built-in dataset with the loss, the input/output widths and the model that fit it."""

    train: Callable[[int], ArrayDataset]
    eval: Callable[[int], ArrayDataset]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    in_features: int
    out_features: int
    model: str = "mlp"
    """The built-in model a run uses when it names none."""


# Separate streams for train and eval data: seed and seed + 1_000_003.
_EVAL_SEED_OFFSET = 1_000_003

DATASETS: dict[str, Task] = {
    "linear": Task(
        train=lambda seed: linear_data(10_000, seed),
        eval=lambda seed: linear_data(100, seed + _EVAL_SEED_OFFSET),
        loss=F.mse_loss,
        in_features=1,
        out_features=1,
        model="linear",
    ),
    "digits": Task(
        train=lambda seed: digits_data("train"),
        eval=lambda seed: digits_data("eval"),
        loss=F.cross_entropy,
        in_features=64,
        out_features=10,
    ),
    "classification": Task(
        train=lambda seed: classification_data(4_096, seed),
        eval=lambda seed: classification_data(512, seed + _EVAL_SEED_OFFSET),
        loss=F.cross_entropy,
        in_features=16,
        out_features=4,
    ),
}

MODELS: dict[str, Callable[..., nn.Module]] = {"linear": linear, "mlp": mlp}
