"""FlatGradient: a model's trainable parameters' gradients in one contiguous buffer (what a wire
hands over in one piece), how backward's gradients get into it, the BatchNorm running statistics
that travel after it, and the host buffers a GPU replica's gradient crosses to the host through.
Plain PyTorch."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .syncbn import GlobalBatchNorm

# Elements of a gradient copied and summed at a time (512 KiB of float32: stays in a core's cache),
# so checking it costs no second read from memory (a 67 MB gradient: 17.9 -> 12.3 ms, one thread).
GATHER_PIECE = 1 << 17

# Below this many gradient elements per parameter (on average), backward accumulates into .grad
# views of the zeroed flat buffer instead of fresh gradients gathered by hooks (FlatGradient.
# in_place): there a hook's few tensor operations per parameter cost more than the passes over the
# gradient they save. One replica in one process, us a step, hooks vs in place: the seed's linear
# model (1 element a parameter) ~460 vs ~350; MLPs of 289, 3.2 K, 11.9 K elements a parameter
# 740-1230 vs 630-1040, ~1360 vs ~1120, ~1660 vs ~1470; 45.6 K even (~3000); 179 K and 707 K: hooks
# ~10% faster.
IN_PLACE_PER_PARAM = 1 << 15


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The BatchNorm running means and variances of `model` (the buffers its training forward
    updates from the batch), in module order."""
    return [buffer for m in model.modules()
            if isinstance(m, _BatchNorm) and not isinstance(m, GlobalBatchNorm) and m.track_running_stats
            for buffer in (m.running_mean, m.running_var) if buffer is not None]


def attach_flat_grad(model: nn.Module, spare: int = 0) -> torch.Tensor:
    """Give every trainable parameter a .grad that is a view into one contiguous buffer.

    The optimizer then reads the all-reduced gradient from the buffer, and one step hands over one
    array (Learner.gradient gathers backward's gradients into it). The buffer is of the widest
    parameter dtype, at least float32 (16-bit gradients are summed in float32); a parameter of a
    narrower dtype gets a .grad of its own instead of a view, filled from the buffer (FlatGradient.
    scatter). The buffer's storage holds `spare` elements more after the gradient (see with_spare).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter: nothing to train")
    dtype = functools.reduce(torch.promote_types, {p.dtype for p in params}, torch.float32)
    numel = sum(p.numel() for p in params)
    stats = sum(b.numel() for b in running_statistics(model))  # after the gradient: see FlatGradient
    flat = torch.zeros(numel + stats + spare, dtype=dtype, device=params[0].device)[:numel + stats]
    point_grads(params, flat, {i: torch.zeros_like(p) for i, p in enumerate(params) if p.dtype != dtype})
    return flat


def point_grads(params: list[nn.Parameter], flat: torch.Tensor, narrow: dict[int, torch.Tensor]) -> None:
    """Make each parameter's .grad its view of `flat` (parameters in order, back to back), or
    narrow[index] for a parameter of another dtype than flat's."""
    offset = 0
    for index, p in enumerate(params):
        p.grad = narrow[index] if index in narrow else flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def with_spare(flat: torch.Tensor, spare: int) -> torch.Tensor:
    """`flat` and the `spare` elements after it in its storage, as one tensor (a view: no copy)."""
    return flat.new_empty(0).set_(flat.untyped_storage(), flat.storage_offset(), (flat.numel() + spare,))


class FlatGradient:
    """A model's trainable parameters' gradients in one contiguous buffer, `flat`, whose views are
    the parameters' .grad (where the optimizer reads the all-reduced gradient). Backward runs into
    fresh gradients, and a hook gathers each into a flat buffer as soon as it is final: cheaper than
    zeroing the buffer and accumulating into it (one pass over the gradient instead of three), and
    the buffer can be the wire's own (the shared-memory wire's, read by the peers; the collective
    wire reduces a bucket as soon as it is full: `on_ready`).

    The rule for BatchNorm: its running means and variances travel after the gradient, in the same
    buffer, weighted like the gradients (n_r / n), and every replica takes the all-reduced values:
    the replicas' buffers never diverge. The running mean is then the one one process computes
    (its update is linear in the batch mean); the running variance leaves out the spread between
    the parts' means, and each replica normalizes with its own part's batch statistics, so a model
    with BatchNorm trains something that depends on W (the console says so at start).

    Small parameters (`in_place`: below IN_PLACE_PER_PARAM elements each, on average, all of
    flat's dtype) keep the old way: the .grad views of flat stay, flat is zeroed, backward
    accumulates into it, and the gradient is checked and copied out once, after backward."""

    def __init__(self, model: nn.Module, device: torch.device, check: bool = True):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stats = running_statistics(model)
        self.flat = attach_flat_grad(model, spare=1)
        # parameters of a narrower dtype than flat's (bf16 beside fp32): their .grad is their own
        self.narrow = {i: p.grad for i, p in enumerate(self.params) if p.dtype != self.flat.dtype}
        bounds = np.cumsum([0] + [p.numel() for p in self.params] + [sum(b.numel() for b in self.stats)])
        # each parameter's place in flat, and the running statistics' (one entry more, where any)
        self.bounds = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))[:len(self.params) + bool(self.stats)]
        self.in_place = not self.narrow and self.flat.numel() < IN_PLACE_PER_PARAM * len(self.params)
        self.views = [p.grad for p in self.params]  # in place: the .grad backward accumulates into
        for index, p in enumerate(self.params):
            if not self.in_place:
                p.register_post_accumulate_grad_hook(functools.partial(self._filled, index))
        self.check = check  # sum the gradients as they come (NaN and inf propagate through a sum)
        # while backward runs for the last micro-batch: where gradients are gathered, and which came
        self.gathered: Optional[torch.Tensor] = None
        self.filled: set[int] = set()
        self.checksum = torch.zeros((), device=device)
        # called with a parameter's index once its gradient of the step is gathered (a wire can
        # start reducing it while backward goes on)
        self.on_ready: Optional[Callable[[int], None]] = None

    def release(self) -> None:
        """A new gradient begins: backward makes fresh tensors (the views in flat let go), or, in
        place, accumulates into the zeroed views (pointed at flat again if anything replaced them)."""
        self.filled.clear()
        if self.in_place:
            if any(p.grad is not view for p, view in zip(self.params, self.views)):
                point_grads(self.params, self.flat, self.narrow)
                self.views = [p.grad for p in self.params]
            self.flat.zero_()
            return
        for p in self.params:
            p.grad = None
        self.checksum.zero_()

    def gather_into(self, out: Optional[torch.Tensor]) -> None:
        """The next backward's gradients, as each is final, go into `out` (None: they accumulate)."""
        self.gathered = out

    def put_statistics(self, out: torch.Tensor, weight: float) -> None:
        """After the last forward: the running statistics, times `weight`, into their place in `out`."""
        if self.stats:
            lo, hi = self.bounds[-1]
            out[lo:hi].copy_(torch.cat([b.reshape(-1) for b in self.stats]).mul_(weight))
            self._ready(len(self.params))

    def take_statistics(self) -> None:
        """The all-reduced running statistics in flat into the model's buffers."""
        if self.stats:
            offset = self.bounds[-1][0]
            for buffer in self.stats:
                buffer.copy_(self.flat[offset:offset + buffer.numel()].view_as(buffer))
                offset += buffer.numel()

    def complete(self, out: torch.Tensor) -> None:
        """After the last backward: zeros in `out` for the parameters it did not reach, and every
        .grad a view of flat again."""
        self.gathered = None
        if self.in_place:  # the gradient is in flat: checked, copied out (not the statistics: in `out`)
            end = self.bounds[len(self.params) - 1][1]
            if self.check:
                self.checksum = self.flat[:end].sum()
            if out is not self.flat:
                out[:end].copy_(self.flat[:end])
            for index in range(len(self.params)):
                self._ready(index)
            return
        for index in range(len(self.bounds)):
            if index not in self.filled:
                lo, hi = self.bounds[index]
                out[lo:hi].zero_()
                self._ready(index)
        point_grads(self.params, self.flat, self.narrow)

    def scatter(self) -> None:
        """The (all-reduced) gradient in flat into the narrower parameters' own .grad."""
        for index, grad in self.narrow.items():
            lo, hi = self.bounds[index]
            grad.copy_(self.flat[lo:hi].view_as(grad))

    def _filled(self, index: int, param: nn.Parameter) -> None:
        """Backward's hook: parameter `index` has its final gradient of this backward."""
        if self.gathered is None:
            return
        lo, hi = self.bounds[index]
        fresh = param.grad.reshape(-1)
        if not self.check:
            self.gathered[lo:hi].copy_(fresh)
        else:
            for start in range(0, hi - lo, GATHER_PIECE):  # each piece summed while in cache
                piece = self.gathered[lo + start:min(hi, lo + start + GATHER_PIECE)]
                piece.copy_(fresh[start:start + len(piece)])
                self.checksum += piece.sum()
        param.grad = None  # freed now, not at the end of backward
        self._ready(index)

    def _ready(self, index: int) -> None:
        self.filled.add(index)
        if self.on_ready is not None:
            self.on_ready(index)


def host_buffers(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the gradient is all-reduced on the host: (host_buffer, staging). On CPU both are the
    flat gradient itself. On a GPU, gradients cross to the host through pinned buffers (copies
    that do not block the host): `staging` takes this replica's gradient out; the reduced one comes
    back in `host_buffer`, which has one element more, where a collective carries the loss."""
    if flat.device.type == "cpu":
        return with_spare(flat, 1), flat
    return (torch.empty(flat.numel() + 1, dtype=flat.dtype, pin_memory=True),
            torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=True))
