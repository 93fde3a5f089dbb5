"""Fully sharded data parallel (TrainConfig.shard 'full'): the model's parameters, gradients and
optimizer state split over the replicas by PyTorch's FSDP2 (`fully_shard`), on the collective
wire's process group (gloo on CPUs, NCCL on GPUs). The wrapping is one function applied inside
the replica (torchtitan's parallelize step): the model stays plain PyTorch.

Each block (`blocks`: the default policy, or the user's shard_blocks) is one FSDP unit: its
parameters are all-gathered for its forward and its backward and freed after, and its gradient
is reduce-scattered as backward produces it, summed (no divide by W: each replica's loss comes
weighted by its share of the batch, n_r / n), so that each replica's .grad is its shard of the
gradient one process computes. What travels on the wire besides is the loss alone.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..core.snapshot import Snapshot, digest
from .flatgrad import running_statistics


def has_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The units to shard: the children of the model's largest nn.ModuleList or nn.Sequential (a
    transformer's blocks, a ResNet's stages, an MLP's layers) that hold trainable parameters;
    where it has none, its direct children that do. Every other parameter (embeddings, a final
    norm) goes with the root unit."""
    containers = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    best = max(containers, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    blocks = [m for m in best.children() if has_parameters(m)] if best is not None else []
    if len(blocks) < 2:
        blocks = [m for m in model.children() if has_parameters(m)]
    return blocks


def refusal(model: nn.Module, blocks_fn: Optional[Callable] = None) -> Optional[tuple[str, str]]:
    """Why `model` cannot be fully sharded, as (the field to change, what to do); None where it can.
    Checked on the driver's model before any replica starts."""
    if running_statistics(model):
        return ("shard", "with shard 'full', BatchNorm's running statistics would differ by replica (they are not "
                         "sharded or reduced yet): use GroupNorm or LayerNorm, or shard 'none'")
    try:
        blocks = list((blocks_fn or default_blocks)(model))
    except Exception as e:
        return ("shard_blocks", f"shard_blocks(model) raised {type(e).__name__}: {e}")
    if not blocks:
        return ("shard_blocks", f"the model ({type(model).__name__}) has no submodule with parameters to shard as a "
                                f"unit: give shard_blocks (pkg.module:fn returning its blocks), or shard 'none'")
    inside = {id(m) for m in model.modules() if m is not model}
    if any(id(block) not in inside for block in blocks):
        return ("shard_blocks", "shard_blocks(model) must return submodules of the model (not the model itself)")
    return None


def parallelize(model: nn.Module, world: int, device: torch.device,
                blocks_fn: Optional[Callable[[nn.Module], Sequence[nn.Module]]] = None) -> list[nn.Module]:
    """Shard `model` over the `world` replicas of the process group in place: each block
    (blocks_fn(model), or default_blocks; `refusal` has checked them) a unit, then the root.
    Returns the blocks."""
    blocks = list((blocks_fn or default_blocks)(model))
    mesh = init_device_mesh(device.type, (world,))
    for unit in blocks + [model]:
        fully_shard(unit, mesh=mesh)
        # a plain sum (each replica's loss comes weighted by n_r / n), as a SUM: gloo has no
        # PREMUL_SUM, which a divide factor of 1 would otherwise ask for. Each unit's own setting.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return blocks


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This replica's shard of `tensor` (a DTensor), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def nbytes(tensors) -> int:
    """Bytes this replica holds of `tensors` (of a DTensor: its shard)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors if torch.is_tensor(t))


class ShardedGradient:
    """FlatGradient's part under FSDP2: each parameter's .grad is this replica's shard of the summed
    gradient, which FSDP2 reduce-scatters during backward. The flat gradient a wire hands over is
    empty (its one spare element carries the loss); `checksum` sums the shard, so a NaN or inf in
    it makes this replica's loss NaN, and every replica skips (or stops) alike."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stats: list[torch.Tensor] = []  # BatchNorm's running statistics: refused at start
        self.flat = torch.zeros(1, device=device)[:0]
        self.bounds: list[tuple[int, int]] = []
        self.checksum = torch.zeros((), device=device)
        self.on_ready = None

    def release(self) -> None:
        for p in self.params:
            p.grad = None

    def gather_into(self, out) -> None:
        pass

    def put_statistics(self, out, weight: float) -> None:
        pass

    def take_statistics(self) -> None:
        pass

    def complete(self, out) -> None:
        grads = [local(p.grad) for p in self.params if p.grad is not None]
        self.checksum = torch.stack([g.float().sum() for g in grads]).sum() if grads else self.checksum.zero_()

    def scatter(self) -> None:
        pass


# Gathered whole on the first replica only, on the CPU: the others hold no copy of the model.
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ShardedState:
    """A fully sharded replica's snapshot and restore (PyTorch's distributed state_dict): taking
    one is a collective (every replica must take part); the first replica's holds the whole model
    and optimizer state, the others' hold none. A restore gives each replica the whole state, and
    each keeps its shard."""

    @staticmethod
    def model(model: nn.Module) -> dict[str, torch.Tensor]:
        return get_model_state_dict(model, options=GATHERED)

    @staticmethod
    def optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return get_optimizer_state_dict(model, optimizer, options=GATHERED)

    @staticmethod
    def load(model: nn.Module, optimizer: torch.optim.Optimizer, snapshot: Snapshot) -> None:
        whole = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, snapshot.model, options=whole)
        set_optimizer_state_dict(model, optimizer, snapshot.optimizer, options=whole)

    @staticmethod
    def digest(model: nn.Module) -> str:
        """SHA-256 of the gathered parameters (the first replica's), told to every replica."""
        state = ShardedState.model(model)
        told = [digest(state.values()) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(told, src=0)
        return told[0]
