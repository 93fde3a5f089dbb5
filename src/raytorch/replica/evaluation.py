"""A replica's evaluation of its part of the eval set: the mean loss, and a classifier's accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.datasets import fetch
from .batches import checked_loss, to_device
from .device import autocast

# What a fully sharded replica without samples runs, counted as none (here, and in Learner.gradient): sample 0.
STAND_IN = np.zeros(1, dtype=np.int64)

if TYPE_CHECKING:
    from .learner import Learner


def pieces(indices: np.ndarray, chunk: int, rounds: int) -> list[np.ndarray]:
    """The forwards an evaluation of the samples at `indices` runs: chunks of `chunk`; with `rounds`
    (fully sharded: every replica runs as many forwards, FSDP2's all-gathers pair up), that many."""
    if rounds:
        return np.array_split(indices, rounds)
    return [indices[start:start + chunk] for start in range(0, len(indices), chunk)]


def evaluate(learner: Learner, indices: np.ndarray, chunk: int, rounds: int = 0) -> tuple[float | None, float | None]:
    """Mean loss over the eval samples at `indices`, in chunks of `chunk` (or `rounds` pieces: see
    pieces), and, for a classifier (outputs of shape (n, classes) against integer labels), the
    fraction classified right. (None, None) where there are no samples."""
    if len(indices) == 0 and not rounds:
        return None, None
    learner.model.eval()
    total, correct, classifier = 0.0, 0, True
    supervised = learner.supervised
    with torch.no_grad(), autocast(learner.device, learner.precision):
        for part in pieces(indices, chunk, rounds):
            # fully sharded, no samples left here: a forward of sample 0 for the collectives, not counted
            n, part = (len(part), part) if len(part) else (0, STAND_IN)
            batch = to_device(fetch(learner.eval_set, part, collate=learner.collate), learner.device)
            if supervised is None:  # the user's step: its loss, no accuracy
                total += checked_loss(learner.step(learner.forward, batch)).item() * n
                classifier = False
                continue
            x, y = supervised.split(batch)
            output = learner.forward(x)
            total += checked_loss(supervised.loss(output, y)).item() * n
            classifier = classifier and output.dim() == 2 and output.shape[1] > 1 and not y.is_floating_point()
            if classifier and n:
                correct += (output.argmax(dim=1) == y).sum().item()
    learner.model.train()
    if len(indices) == 0:
        return None, None
    return total / len(indices), (correct / len(indices) if classifier else None)
