"""The object-store wire: a replica's gradient is its call's return value, a Ray object."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .protocol import sum_whole, weighted_loss


class ObjectStoreWire:
    """The gradient is the step's return value: Ray copies it into the object store once, peers on
    the same node read it zero-copy, other nodes fetch it. The driver passes the references on, so
    Ray itself orders each step after the previous one."""

    kind = "object_store"
    waited = 0.0  # Ray resolves the peers' gradients before a call starts: no wait inside one
    buffer_bytes = 0  # the object store holds the gradients

    def target(self, step: int) -> None:
        return None  # the replica's own buffer: Ray copies it into the object store

    def publish(self, flat: torch.Tensor, step: int, loss: float) -> tuple[np.ndarray, float]:
        return flat.detach().cpu().numpy(), loss

    def read(self, item: tuple[np.ndarray, float]) -> tuple[np.ndarray, float]:
        """A peer's gradient and the local loss that came with it."""
        return item

    def all_reduce(self, items: Sequence, grad_weights: Sequence[float], loss_weights: Sequence[float],
                   out: torch.Tensor) -> float:
        """out = sum of grad_weights[i] * gradient i, in order; returns the sum of loss_weights[i] *
        its local loss. Every replica reads every routed gradient whole: fine within a node, where
        Ray maps them zero-copy."""
        return weighted_loss(loss_weights, sum_whole(self.read, items, grad_weights, out))

    def applied(self, step: int) -> None:
        pass

    def fail(self) -> None:
        pass

    def abandon(self, rank: int) -> None:
        pass  # a dead peer's objects fail by themselves: Ray reports the actor's death
