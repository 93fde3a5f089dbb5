"""BatchNorm over the whole global batch (TrainConfig.sync_batchnorm): each training forward's
batch statistics are summed over the replicas, so every replica normalizes by the mean and
variance one process computes over the global batch, and the contract holds with BatchNorm too.
DDP's SyncBatchNorm does this on GPUs; this one runs on any device gloo or NCCL reaches, CPUs too.

The statistics travel by a differentiable all-reduce (Summed): backward all-reduces their
gradients in turn, so each replica's gradient is its share of the global batch's, as one
process's backward gives. Two all-reduces a layer forward (sum and count, then the squared
deviations from the global mean: the two-pass variance one process computes) and two backward.
Every replica must run each step's forward with at least one sample (TrainConfig checks it).
Plain PyTorch and torch.distributed: the group is set by the wire (use_group).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..wire.protocol import PeerFailed

_group: Optional[dist.ProcessGroup] = None  # this process's replicas' group; None: statistics stay local


def use_group(group: Optional[dist.ProcessGroup]) -> None:
    """Sum the batch statistics over `group` from now on (None: each replica's own, as plain BatchNorm)."""
    global _group
    _group = group


def join(backend: str) -> None:
    """Once the replicas' process group has started (called by every replica, in the same order):
    statistics on a gloo group of their own, apart from the gradient's buckets, or on the NCCL
    group itself (their tensors are on the GPU)."""
    use_group(dist.new_group(backend="gloo") if backend == "gloo" else dist.group.WORLD)


class Summed(torch.autograd.Function):
    """The sum of a tensor over the replicas; backward: the sum of its gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduced(tensor.clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduced(grad.clone(memory_format=torch.contiguous_format))


def all_reduced(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed in place over the group; PeerFailed where a peer failed (a replica lost
    mid-forward: its peers stop at once, and are not the ones to blame)."""
    try:
        dist.all_reduce(tensor, group=_group)
    except RuntimeError as e:
        raise PeerFailed(f"BatchNorm's statistics could not be summed with the other replicas: "
                         f"{str(e).splitlines()[0]}") from e
    return tensor


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm1d/2d/3d whose training statistics are the global batch's (over the group set by
    use_group); in eval, or with no group, plain BatchNorm. Same parameters and buffers, so a
    state_dict moves between it and the module it replaced."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"BatchNorm expects input of shape (N, C, ...), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _group is not None):
            return super().forward(x)
        self._check_input_dim(x)
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # as autocast runs BatchNorm
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # the global batch's mean, then its (biased) variance: two passes, as one process computes them
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.shape[1]])])
        total = Summed.apply(local)
        count, mean = total[-1], total[:-1] / total[-1]
        centered = x - mean.view(shape)
        var = Summed.apply((centered * centered).sum(dims)) / count
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._track(mean.detach(), var.detach(), count.item())
        return out

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """The running statistics' update plain BatchNorm makes (unbiased variance, momentum or,
        with momentum None, the cumulative average)."""
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)


def convert(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm (1d, 2d, 3d) replaced by a GlobalBatchNorm holding its
    parameters and buffers (torch.nn.SyncBatchNorm.convert_sync_batchnorm's walk)."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        # its parameters and buffers are the old module's own (device and dtype with them)
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert(child))
    return out


def synchronized(model: nn.Module) -> bool:
    """Whether `model` holds a GlobalBatchNorm."""
    return any(isinstance(m, GlobalBatchNorm) for m in model.modules())

