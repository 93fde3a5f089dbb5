"""Sharded update: each replica steps its own chunk of the parameters and of the optimizer's state,
and every replica's model and optimizer then live in the buffers they stepped together (the update
of ZeRO stage 1, without its all-gather: on one node the replicas share one copy of the parameters
and of the state), on the shared-memory wire past two replicas.

After the reduce-scatter replica p holds the reduced gradient of chunk p only; instead of
gathering the whole gradient and stepping every parameter (what every replica would otherwise do,
W times the same work on one node's cores and memory), it steps chunk p of the parameters and of
the optimizer's state (SGD's momentum, Adam's moments) into buffers in /dev/shm that every replica
maps; once every chunk is there, each replica points its model's parameters and its optimizer's
state at those buffers. Per replica the step's memory traffic falls from the whole model's (SGD:
read parameters and gradient, write parameters, 3 models; Adam: 7) to 1/W of it, with no copy of
the parameters; every replica holds the same bits, which equal one process's optimizer: each chunk
is stepped once, by its owner, and the optimizers used step element by element.

A lost replica takes nothing with it: the buffers live in /dev/shm, mapped by every replica, and
two sets alternate by step, so a replica killed while stepping its chunk leaves every model and
optimizer state on the other set, whole, at the previous step; the optimizer's state_dict (a
snapshot, a checkpoint) reads the whole state there. `why_not` names what keeps a run unsharded.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .shared_memory import SharedMemoryWire

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


def state_keys(optimizer: torch.optim.Optimizer, group: dict) -> Optional[list[str]]:
    """The state `optimizer` keeps per parameter element for the parameters of `group`, by key,
    where raytorch can shard it; None where it cannot (another optimizer, or one of its modes that
    keeps other state or steps differently on a chunk)."""
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        if group["momentum"] and group["dampening"]:
            return None  # SGD's first step takes the gradient whole as the buffer: dampening would differ
        return ["momentum_buffer"] if group["momentum"] else []
    if kind in (torch.optim.Adam, torch.optim.AdamW) and not (
            group["fused"] or group["capturable"] or group["differentiable"]):
        return ["exp_avg", "exp_avg_sq"] + ["max_exp_avg_sq"] * bool(group["amsgrad"])
    return None


def why_not(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], flat: torch.Tensor, *,
            statistics: bool, grad_clip: Optional[float], scaled: bool) -> Optional[str]:
    """Why the update of this learner cannot be sharded, in words; None where it can."""
    if any(state_keys(optimizer, group) is None for group in optimizer.param_groups):
        return (f"raytorch shards the update of SGD (without dampening), Adam and AdamW (not fused, "
                f"capturable or differentiable); this one is {type(optimizer).__name__}")
    if sorted(id(p) for g in optimizer.param_groups for p in g["params"]) != sorted(id(p) for p in params):
        return "the optimizer does not step every trainable parameter once"
    if any(p.dtype != flat.dtype or p.device.type != "cpu" or not p.is_contiguous() for p in params):
        return "parameters of several dtypes, on a GPU, or not contiguous"
    if statistics:
        return "BatchNorm running statistics travel with the gradient"
    if grad_clip is not None or scaled:
        return "gradient clipping or fp16 loss scaling needs the whole gradient"
    return None


def shared_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """What a sharded update keeps in shared buffers: the parameters, then the optimizer's state by key."""
    keys = [key for group in optimizer.param_groups for key in state_keys(optimizer, group)]
    return ["params"] + list(dict.fromkeys(keys))


class ShardedUpdate:
    """Steps this replica's chunk of the parameters, and of the optimizer's state, with a shard of
    `optimizer` (an optimizer of its kind over views of the chunk, given the real one's
    hyper-parameters, which the schedule moves, before each step), then moves the model and the
    optimizer's state onto the buffers all replicas stepped.

    The chunk is stepped in the wire's shared buffers of the step's parity, not in the model: a
    peer lost before every chunk of a step is there leaves every model and optimizer state on the
    other buffers, at the previous step, whole. Once all are there each replica points its model's
    parameters and its optimizer's state at those buffers (no copy: the replicas of a node hold one
    set between them, and the optimizer's state_dict reads whole there); `release` gives the
    replica its own copy again."""

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
        self.keys = [state_keys(optimizer, group) for group in optimizer.param_groups]  # per real group
        self.counted = type(optimizer) is not torch.optim.SGD  # Adam's state counts the steps taken
        self.steps = 0.0  # steps the optimizer has taken once the buffers being stepped are taken
        self.bound: dict[int, tuple] = {}  # per set of shared buffers (by the parameters' address): views, shard
        self.shared = False  # whether the model's parameters (and the state) are views of a wire's buffers

    def _bind(self, buffers: dict[str, np.ndarray]) -> tuple[dict, Optional[torch.optim.Optimizer], dict]:
        """For a set of shared buffers (by name, as the wire's gather_params gives them): per name,
        a view per piece of this replica's chunk; a shard of the optimizer over the parameters'
        views (None: no piece); per name, a view per parameter, shaped as the model's."""
        address = buffers["params"].ctypes.data
        if address not in self.bound:
            flats = {name: torch.from_numpy(buffer) for name, buffer in buffers.items()}
            pieces = {name: [flat[self.offsets[index] + start:self.offsets[index] + end]
                             for index, start, end, _ in self.mine] for name, flat in flats.items()}
            groups = {g: [] for g in self.groups}
            for (index, *_), view in zip(self.mine, pieces["params"]):
                groups[self.group_of[index]].append(view)
            shard = type(self.optimizer)([{"params": groups[g]} for g in self.groups], lr=0.0) if self.mine else None
            shaped = {name: [flat[lo:lo + p.numel()].view_as(p) for lo, p in zip(self.offsets, self.model)]
                      for name, flat in flats.items()}
            self.bound[address] = pieces, shard, shaped
        return self.bound[address]

    def step(self, buffers: dict[str, np.ndarray], reduced: torch.Tensor, finite: bool) -> None:
        """Step this replica's chunk of the parameters and the state into `buffers` with `reduced`
        (its chunk of the all-reduced gradient), unless not `finite`: then the chunk goes there as
        it is."""
        pieces, shard, _ = self._bind(buffers)
        state = self.optimizer.state
        taken = state.get(self.model[0], {}).get("step") if self.counted else None
        self.steps = float(taken) if taken is not None else 0.0
        for i, (index, start, end, _) in enumerate(self.mine):  # the chunk as the replica holds it now
            param = self.model[index]
            pieces["params"][i].copy_(param.detach().view(-1)[start:end])
            for key in self.keys[self.group_of[index]]:
                held = state.get(param, {}).get(key)
                if held is None:  # no step taken yet: the optimizer's own state starts at zeros
                    pieces[key][i].zero_()
                else:
                    pieces[key][i].copy_(held.detach().view(-1)[start:end])
        if finite and shard is not None:
            for i, (index, start, end, offset) in enumerate(self.mine):
                view = pieces["params"][i]
                view.grad = reduced[offset:offset + end - start]
                shard.state[view] = {key: pieces[key][i] for key in self.keys[self.group_of[index]]}
                if self.counted:
                    shard.state[view]["step"] = torch.tensor(self.steps)
            for shard_group, g in zip(shard.param_groups, self.groups):
                shard_group.update({k: v for k, v in self.optimizer.param_groups[g].items() if k != "params"})
            shard.step()
        self.steps += finite

    def take(self, buffers: dict[str, np.ndarray]) -> None:
        """Point the model's parameters, and the optimizer's state, at `buffers`, every chunk of
        them stepped."""
        shaped = self._bind(buffers)[2]
        for i, param in enumerate(self.model):
            param.data = shaped["params"][i]
            keys = self.keys[self.group_of[i]]
            if keys or self.counted:
                entry = self.optimizer.state[param]
                entry.update({key: shaped[key][i] for key in keys})
                if self.counted:
                    entry["step"] = torch.tensor(self.steps)
        self.shared = True

    def release(self) -> None:
        """Give the replica a model and optimizer state of its own again (copies of the shared
        ones): before the wire goes, or a state is loaded."""
        if self.shared:
            for i, param in enumerate(self.model):
                param.data = param.detach().clone()
                entry = self.optimizer.state.get(param, {})
                for key in self.keys[self.group_of[i]]:
                    if key in entry:
                        entry[key] = entry[key].clone()
            self.shared = False

    def apply(self, wire: SharedMemoryWire, step: int, reduced: torch.Tensor, finite: bool) -> None:
        """Step this replica's chunk into the wire's buffers of `step`, then take the buffers once
        every replica's chunk is there."""
        self.step(wire.shared_of(step), reduced, finite)
        self.take(wire.gather_params(step))


def release(update: Optional[ShardedUpdate]) -> None:
    """The model's parameters its own again where `update` shares them (ShardedUpdate.release)."""
    if update is not None:
        update.release()
