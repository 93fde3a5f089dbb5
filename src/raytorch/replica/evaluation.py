"""A replica's evaluation of its part of the eval set: the mean loss, and a classifier's accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.datasets import fetch
from .batches import checked_loss, to_device
from .device import autocast

if TYPE_CHECKING:
    from .learner import Learner


def evaluate(learner: Learner, indices: np.ndarray, chunk: int) -> tuple[float | None, float | None]:
    """Mean loss over the eval samples at `indices`, in chunks of `chunk`, and, for a classifier
    (outputs of shape (n, classes) against integer labels), the fraction classified right.
    (None, None) where there are no samples."""
    if len(indices) == 0:
        return None, None
    learner.model.eval()
    total, correct, classifier = 0.0, 0, True
    supervised = learner.supervised
    with torch.no_grad(), autocast(learner.device, learner.precision):
        for start in range(0, len(indices), chunk):
            part = indices[start:start + chunk]
            batch = to_device(fetch(learner.eval_set, part, collate=learner.collate), learner.device)
            if supervised is None:  # the user's step: its loss, no accuracy
                total += checked_loss(learner.step(learner.forward, batch)).item() * len(part)
                classifier = False
                continue
            x, y = supervised.split(batch)
            output = learner.forward(x)
            total += checked_loss(supervised.loss(output, y)).item() * len(part)
            classifier = classifier and output.dim() == 2 and output.shape[1] > 1 and not y.is_floating_point()
            if classifier:
                correct += (output.argmax(dim=1) == y).sum().item()
    learner.model.train()
    return total / len(indices), (correct / len(indices) if classifier else None)
