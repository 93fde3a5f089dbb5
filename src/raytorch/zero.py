"""Sharded update: each replica steps its own chunk of the parameters, then every replica copies
the stepped chunks of all (the update of ZeRO stage 1), on the shared-memory wire past two replicas.

After the reduce-scatter replica p holds the reduced gradient of chunk p only; instead of
gathering the whole gradient and stepping every parameter (what every replica would otherwise do,
W times the same work on one node's cores and memory), it steps chunk p of the parameters and
publishes it; every replica then copies each peer's stepped chunk into its model. Per replica the
step's memory traffic falls from ~3 whole models (read parameters and gradient, write parameters)
plus the gathered gradient to 3/W of one, and every replica ends with the same bits: each chunk is
stepped once, by its owner, and copied.

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
    before each step) and copies every replica's stepped chunk into the model.

    The chunk is stepped in a buffer of the wire's (two, alternating by step, which the peers read),
    not in the model: a peer lost before every chunk of a step is published leaves every survivor's
    model at the previous step, whole."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                 chunks: Sequence[tuple[int, int]], rank: int, buffers: Sequence[np.ndarray]):
        """`chunks`: each replica's [lo, hi) of the flat gradient (reduce.chunk_bounds); `buffers`:
        this replica's two chunk buffers (one per step parity)."""
        self.optimizer, self.params = optimizer, [p.detach().view(-1) for p in params]
        numels = [p.numel() for p in params]
        self.slices = [chunk_slices(numels, lo, hi) for lo, hi in chunks]
        self.mine = self.slices[rank]
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.group_of = [group_of[id(p)] for p in params]
        self.groups = sorted({self.group_of[index] for index, *_ in self.mine})  # the real groups in the chunk
        # per parity: a view of the buffer per piece of the chunk, and an SGD over them (None: no piece)
        self.views = [[torch.from_numpy(b)[offset:offset + end - start] for _, start, end, offset in self.mine]
                      for b in buffers]
        self.shards = [self._shard(views) for views in self.views]

    def _shard(self, views: list[torch.Tensor]) -> Optional[torch.optim.SGD]:
        if not views:
            return None
        groups = {g: [] for g in self.groups}
        for (index, *_), view in zip(self.mine, views):
            groups[self.group_of[index]].append(view)
        return torch.optim.SGD([{"params": groups[g]} for g in self.groups], lr=0.0)

    def step(self, step: int, reduced: torch.Tensor, finite: bool) -> None:
        """Step this replica's chunk of the parameters, in the buffer of `step`'s parity, with
        `reduced` (its chunk of the all-reduced gradient) unless not `finite`."""
        shard, views = self.shards[step % 2], self.views[step % 2]
        for (index, start, end, _), view in zip(self.mine, views):  # the chunk as the model holds it now
            view.copy_(self.params[index][start:end])
        if finite and shard is not None:
            for (_, start, end, offset), view in zip(self.mine, views):
                view.grad = reduced[offset:offset + end - start]
            for shard_group, g in zip(shard.param_groups, self.groups):
                shard_group.update({k: v for k, v in self.optimizer.param_groups[g].items() if k != "params"})
            shard.step()

    def take(self, rank: int, chunk: np.ndarray) -> None:
        """Copy replica `rank`'s stepped chunk into the model's parameters."""
        source = torch.from_numpy(chunk)
        for index, start, end, offset in self.slices[rank]:
            self.params[index][start:end].copy_(source[offset:offset + end - start])

    def apply(self, wire: SharedMemoryWire, step: int, reduced: torch.Tensor, finite: bool) -> None:
        """Step this replica's chunk (see step), then take every replica's from `wire`."""
        self.step(step, reduced, finite)
        wire.gather_params(step, self.take)


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
    update = None if unsharded else ShardedUpdate(learner.optimizer, learner.grads.params, wire.chunks, position,
                                                  wire.own.params)
    return wire, update, unsharded
