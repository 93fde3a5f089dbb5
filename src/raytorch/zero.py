"""Sharded update: each replica steps its own chunk of the parameters, and every replica's model
then lives in the buffer they stepped together (the update of ZeRO stage 1, without its
all-gather: on one node the replicas share one copy of the parameters), on the shared-memory wire
past two replicas.

After the reduce-scatter replica p holds the reduced gradient of chunk p only; instead of
gathering the whole gradient and stepping every parameter (what every replica would otherwise do,
W times the same work on one node's cores and memory), it steps chunk p of the parameters into a
buffer in /dev/shm that every replica maps; once every chunk is there, each replica points its
model's parameters at that buffer. Per replica the step's memory traffic falls from ~3 whole
models (read parameters and gradient, write parameters) plus the gathered gradient to 3/W of one,
with no copy of the parameters; every replica holds the same bits, which equal one process's SGD:
each chunk is stepped once, by its owner. Two buffers alternate by step, so a lost replica never
leaves a model part stepped.

Only for an optimizer that keeps no state between steps (plain SGD: no momentum): a lost replica
then takes nothing with it that its peers cannot recompute. Sharding the state of Adam or
momentum would keep each shard on one replica, and recovery (a survivor's state copied into the
replacement) would lose it; `why_not` names what keeps a run unsharded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .wire import SharedMemoryWire

if TYPE_CHECKING:
    from .learner import Learner

# (parameter index, start, end within the parameter's flat view, offset in the chunk)
Slice = tuple[int, int, int, int]


def chunk_slices(numels: Sequence[int], lo: int, hi: int) -> list[Slice]:
    """The pieces of flat elements [lo, hi) of parameters laid back to back (`numels` elements
    each), by parameter, in order; elements past the last parameter (running statistics) are left out."""
    pieces, offset = [], 0
    for index, n in enumerate(numels):
        start, end = max(lo, offset), min(hi, offset + n)
        if start < end:
            pieces.append((index, start - offset, end - offset, start - lo))
        offset += n
    return pieces


def why_not(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], flat: torch.Tensor, *,
            statistics: bool, grad_clip: Optional[float], scaled: bool) -> Optional[str]:
    """Why the update of this learner cannot be sharded, in words; None where it can."""
    if type(optimizer) is not torch.optim.SGD or any(g["momentum"] for g in optimizer.param_groups):
        return "the optimizer keeps state (a shard of it would live on one replica only, and be lost with it)"
    if sorted(id(p) for g in optimizer.param_groups for p in g["params"]) != sorted(id(p) for p in params):
        return "the optimizer does not step every trainable parameter once"
    if any(p.dtype != flat.dtype or p.device.type != "cpu" or not p.is_contiguous() for p in params):
        return "parameters of several dtypes, on a GPU, or not contiguous"
    if statistics:
        return "BatchNorm running statistics travel with the gradient"
    if grad_clip is not None or scaled:
        return "gradient clipping or fp16 loss scaling needs the whole gradient"
    return None


class ShardedUpdate:
    """Steps this replica's chunk of the parameters with a shard of `optimizer` (an SGD of its own
    over views of the chunk, given the real one's hyper-parameters, which the schedule moves,
    before each step), then moves the model onto the parameters all replicas stepped.

    The chunk is stepped in the wire's parameter buffer of the step's parity, shared by every
    replica on the node, not in the model: a peer lost before every chunk of a step is there
    leaves every model on the other buffer, at the previous step, whole. Once all are there each
    replica points its model's parameters at that buffer (no copy: the replicas of a node hold one
    set of parameters between them); `release` gives the model its own copy again."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                 chunks: Sequence[tuple[int, int]], rank: int):
        """`chunks`: each replica's [lo, hi) of the flat gradient (reduce.chunk_bounds)."""
        self.optimizer, self.model = optimizer, list(params)
        numels = [p.numel() for p in params]
        self.offsets = np.cumsum([0] + numels)
        self.mine = chunk_slices(numels, *chunks[rank])
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.group_of = [group_of[id(p)] for p in params]
        self.groups = sorted({self.group_of[index] for index, *_ in self.mine})  # the real groups in the chunk
        self.bound: dict[int, tuple] = {}  # per parameter buffer (by address): its views and shard
        self.shared = False  # whether the model's parameters are views of a wire's buffer

    def _bind(self, buffer: np.ndarray) -> tuple[list[torch.Tensor], Optional[torch.optim.SGD], list[torch.Tensor]]:
        """For a parameter buffer: a view per piece of this replica's chunk, an SGD over them (None:
        no piece), and a view per parameter, shaped as the model's."""
        key = buffer.ctypes.data
        if key not in self.bound:
            flat = torch.from_numpy(buffer)
            views = [flat[self.offsets[index] + start:self.offsets[index] + end] for index, start, end, _ in self.mine]
            groups = {g: [] for g in self.groups}
            for (index, *_), view in zip(self.mine, views):
                groups[self.group_of[index]].append(view)
            shard = torch.optim.SGD([{"params": groups[g]} for g in self.groups], lr=0.0) if views else None
            shaped = [flat[lo:lo + p.numel()].view_as(p) for lo, p in zip(self.offsets, self.model)]
            self.bound[key] = views, shard, shaped
        return self.bound[key]

    def step(self, buffer: np.ndarray, reduced: torch.Tensor, finite: bool) -> None:
        """Step this replica's chunk of the parameters into `buffer` with `reduced` (its chunk of
        the all-reduced gradient), unless not `finite`: then the chunk goes there as it is."""
        views, shard, _ = self._bind(buffer)
        for (index, start, end, _), view in zip(self.mine, views):  # the chunk as the model holds it now
            view.copy_(self.model[index].detach().view(-1)[start:end])
        if finite and shard is not None:
            for (_, start, end, offset), view in zip(self.mine, views):
                view.grad = reduced[offset:offset + end - start]
            for shard_group, g in zip(shard.param_groups, self.groups):
                shard_group.update({k: v for k, v in self.optimizer.param_groups[g].items() if k != "params"})
            shard.step()

    def take(self, buffer: np.ndarray) -> None:
        """Point the model's parameters at `buffer`, every chunk of it stepped."""
        for param, view in zip(self.model, self._bind(buffer)[2]):
            param.data = view
        self.shared = True

    def release(self) -> None:
        """Give the model parameters of its own again (a copy of the shared ones): before the wire
        goes, or a state is loaded into the model."""
        if self.shared:
            for param in self.model:
                param.data = param.detach().clone()
            self.shared = False

    def apply(self, wire: SharedMemoryWire, step: int, reduced: torch.Tensor, finite: bool) -> None:
        """Step this replica's chunk into the wire's buffer of `step`, then take the buffer once
        every replica's chunk is there."""
        self.step(wire.params[step % 2], reduced, finite)
        self.take(wire.gather_params(step))


def release(update: Optional[ShardedUpdate]) -> None:
    """The model's parameters its own again where `update` shares them (ShardedUpdate.release)."""
    if update is not None:
        update.release()


def shared_wire(learner: Learner, prefix: str, position: int, world: int, step: int
                ) -> tuple[SharedMemoryWire, Optional[ShardedUpdate], Optional[str]]:
    """A shared-memory wire for `learner` at `position` among `world` replicas, whose next gradient
    is for global step `step`; its sharded update (None where the update is not sharded) and why not."""
    unsharded = "two replicas" if world <= 2 else why_not(
        learner.optimizer, learner.grads.params, learner.flat_grad, statistics=bool(learner.grads.stats),
        grad_clip=learner.grad_clip, scaled=learner.scaler is not None)
    grad = learner.host_grad
    wire = SharedMemoryWire(position, grad.numel(), grad.numpy().dtype, prefix, step=step, world=world,
                            sharded=unsharded is None)
    update = None if unsharded else ShardedUpdate(learner.optimizer, learner.grads.params, wire.chunks, position)
    return wire, update, unsharded
