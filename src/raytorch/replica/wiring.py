"""The replica's side of setting up a wire: a wire for its Learner's buffers (the collective
group and where it meets, the shared-memory buffers and their sharded update), and what it tells
the driver of its /dev/shm so the driver can choose the wire (wire/choice.py). The wires
themselves know nothing of the Learner: this is where the two meet."""

from __future__ import annotations

from typing import Optional

import ray
import torch

from ..wire.choice import shared_memory_available, shared_memory_room
from ..wire.collective import CollectiveWire, free_port, join
from ..wire.sharded import ShardedUpdate, shared_names, why_not
from ..wire.shared_memory import SharedMemoryWire
from . import fsdp, syncbn
from .flatgrad import host_buffers
from .learner import Learner


def collective_rendezvous() -> tuple[str, int]:
    """An address of this replica's node and a port free there: where a collective group meets."""
    address = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    return address, free_port(address)


def collective_wire(learner: Learner, position: int, world: int, address: str, port: int, timeout_s: float,
                    backend: str = "gloo", grad_dtype: str = "fp32") -> CollectiveWire:
    """`learner`'s wire in a (fresh) group of `world` replicas at `position`, meeting at
    address:port: gloo over host buffers, or NCCL over the GPU's own (the gradient stays on the
    device); gradients in bfloat16 on the wire with `grad_dtype` 'bf16' (TrainConfig.grad_dtype).
    Its gradients come weighted by their share of the batch from now on."""
    join(position, world, address, port, timeout_s, backend, learner.device)
    if learner.shard == "full":  # FSDP2 over the group: the wire carries the loss alone (fsdp.py)
        if learner.full:
            raise RuntimeError("a fully sharded replica cannot join a new group: its shard is spread over the old "
                               "one; start the run again (from its last checkpoint: --resume)")
        shard_fully(learner, world)
    if backend == "nccl":
        learner.reduce_on_device()
    wire = CollectiveWire(position, world, address, port, timeout_s, learner.host_buffer, learner.grads.bounds,
                          backend, torch.bfloat16 if grad_dtype == "bf16" else None, joined=True)
    learner.prescaled = True
    if syncbn.synchronized(learner.model):  # sync_batchnorm: BatchNorm's statistics travel on the group too
        syncbn.join(backend)
    # backward's gradients land in the buffer itself (CPU, NCCL): buckets start as they fill
    learner.grads.on_ready = wire.ready if learner.staging is learner.flat_grad else None
    return wire


def shard_fully(learner: Learner, world: int) -> None:
    """Shard `learner`'s model, gradient and optimizer state over the `world` replicas of the joined
    process group (fsdp.py): its gradient becomes FSDP2's shards, its flat buffers the loss's alone,
    and its optimizer and schedule are made anew over the sharded parameters."""
    fsdp.parallelize(learner.model, world, learner.device, learner.blocks_fn)
    learner.full, learner.states = True, fsdp.ShardedState
    learner.grads = fsdp.ShardedGradient(learner.model, learner.device)
    learner.flat_grad = learner.grads.flat
    learner.host_buffer, learner.staging = host_buffers(learner.flat_grad)
    learner.host_grad = learner.staging if learner.device.type == "cpu" else learner.host_buffer[:0]
    learner.make_optimizer()


def unsharded(learner: Learner) -> Optional[str]:
    """Why `learner`'s update cannot be sharded (why_not), whatever the number of replicas."""
    return why_not(learner.optimizer, learner.grads.params, learner.flat_grad, statistics=bool(learner.grads.stats),
                   grad_clip=learner.grad_clip, scaled=learner.scaler is not None)


def shared_memory_report(learner: Learner) -> dict:
    """What the driver needs to know of this replica's /dev/shm to pick the wire: whether it can be
    used, its free bytes, the gradient's bytes, and the model-sized buffers a sharded update of
    `learner` would map past two replicas (wire.choice.shared_memory_shortfall)."""
    grad = learner.host_grad
    return {"shared_memory": shared_memory_available(), "shm_free": shared_memory_room(),
            "grad_bytes": grad.numel() * grad.element_size(),
            "shared_buffers": 0 if unsharded(learner) else 2 * len(shared_names(learner.optimizer))}


def shared_wire(learner: Learner, prefix: str, position: int, world: int, step: int
                ) -> tuple[SharedMemoryWire, Optional[ShardedUpdate], Optional[str]]:
    """A shared-memory wire for `learner` at `position` among `world` replicas, whose next gradient
    is for global step `step`; its sharded update (None where the update is not sharded) and why not.
    Two replicas sum whole gradients (one wait less) unless shard 'optimizer' asks for the sharded update."""
    asked = learner.shard == "optimizer"
    why = "one replica" if world == 1 else "two replicas" if world == 2 and not asked else unsharded(learner)
    grad = learner.host_grad
    wire = SharedMemoryWire(position, grad.numel(), grad.numpy().dtype, prefix, step=step, world=world,
                            shared=() if why else shared_names(learner.optimizer))
    update = None if why else ShardedUpdate(learner.optimizer, learner.grads.params, wire.chunks, position)
    return wire, update, why
