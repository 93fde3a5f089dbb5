"""How a replica hands its gradient to its peers: the transport half of the all-reduce, as the
replica sees it on any wire (the Wire protocol), and what the wires share.

The driver decides every step and tells each replica which gradients to sum, with which weights;
a wire decides how those gradients travel. Every wire sums each element over the same gradients,
with the same weights, in the same (rank) order, so the reduced gradient has the same bits on
every replica and on every wire.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ..core.reduce import weighted_sum


class PeerFailed(RuntimeError):
    """A peer this replica waits for failed or died: this replica stops too, as a consequence."""


@runtime_checkable
class Wire(Protocol):
    """What a replica calls on its wire, step by step, whichever it is (ObjectStoreWire,
    SharedMemoryWire, CollectiveWire). A sharded update's calls (SharedMemoryWire.reduce_scatter,
    gather_params, shared_of) are the shared-memory wire's own."""

    kind: str
    """Its name, as TrainConfig.reduction says it: 'object_store', 'shared_memory' or 'collective'."""
    waited: float
    """Seconds spent waiting for peers on it, in all: not this replica's own work."""
    buffer_bytes: int
    """Bytes of the buffers it holds besides the replica's own (Replica.memory)."""

    def target(self, step: int) -> Optional[torch.Tensor]:
        """Where step `step`'s gradient goes (backward gathers into it); None: the replica's own buffer."""

    def publish(self, flat: torch.Tensor, step: int, loss: float) -> object:
        """Hand over step `step`'s gradient `flat` and its local `loss`; returns the handoff, what
        the driver routes to the peers."""

    def all_reduce(self, items: Sequence, grad_weights: Sequence[float], loss_weights: Sequence[float],
                   out: torch.Tensor) -> float:
        """out = sum of grad_weights[i] * the gradient of handoff items[i], in order; returns the
        global loss, the sum of loss_weights[i] * its local loss."""

    def applied(self, step: int) -> None:
        """This replica has applied step `step`: the peers' gradients of it are read."""

    def fail(self) -> None:
        """This replica failed: no peer is to wait for it."""

    def abandon(self, rank: int) -> None:
        """The driver declared the peer at wire position `rank` dead: stop waiting for it (called
        from the replica's health thread, while a step may wait)."""


def sum_whole(read: Callable[[object], tuple[np.ndarray, float]], items: Sequence, weights: Sequence[float],
              out: torch.Tensor) -> list[float]:
    """out = sum of weights[i] * the whole gradient of items[i] as `read` (a wire's) gives it, in
    order; returns each gradient's local loss. Every replica reads every gradient: (W - 1) gradients a step."""
    gradients = [read(item) for item in items]
    weighted_sum([grad for grad, _ in gradients], weights, out=out)
    return [loss for _, loss in gradients]


def weighted_loss(weights: Sequence[float], losses: Sequence[float]) -> float:
    """The global loss: each part's local mean loss weighted by its share of the batch, in order."""
    return sum(w * loss for w, loss in zip(weights, losses))
