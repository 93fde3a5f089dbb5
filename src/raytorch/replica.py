"""Replica: one model replica, its optimizer and its loss on its own device, run as a Ray actor.

The class is plain Python (tests build it in-process); the driver runs it with ray.remote.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Callable

import numpy as np
import ray
import torch
from torch import nn

from .config import TrainConfig
from .data import fetch
from .device import replica_device, torch_threads
from .errors import PeerError, ReplicaError
from .optim import make_optimizer, make_schedule
from .reduce import weighted_sum
from .wire import ObjectStoreWire, PeerFailed, SharedMemoryWire, shared_memory_available


def attach_flat_grad(model: nn.Module) -> torch.Tensor:
    """Give every trainable parameter a .grad that is a view into one contiguous buffer.

    backward() then accumulates straight into the buffer, so one step hands over one array.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise TypeError(f"all trainable parameters must share one dtype for the flat gradient, got {dtypes}")
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def proportional_set_size() -> int:
    """This process's memory in bytes, shared pages split among the processes that map them (Linux PSS)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def _reported(method):
    """Re-raise a failure inside a replica as a ReplicaError naming the replica and its step."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            self.wire.fail()  # no peer waits for a replica that has failed
            if isinstance(e, ReplicaError):
                raise
            error = PeerError if isinstance(e, PeerFailed) else ReplicaError
            raise error(
                f"replica {self.rank} failed in {method.__name__} after {self.steps} steps: {type(e).__name__}: {e}"
            ) from e

    return wrapper


class Replica:
    """Holds one replica; per step computes its part's gradient, then applies the all-reduced one."""

    def __init__(self, rank: int, config: TrainConfig, model_fn: Callable[[], nn.Module],
                 loss_fn: Callable, init_state: dict, train_set, eval_set, total_steps: int):
        self.rank = rank
        import torch._dynamo  # noqa: F401  (any torch.optim optimizer imports it: ~70 MB of PyTorch's own)

        self.baseline_pss = proportional_set_size()  # this process with PyTorch loaded, before any model
        torch.set_num_threads(torch_threads(config.cpus_per_replica))
        self.steps = 0
        self.device = replica_device(config.device)
        self.model = model_fn().to(self.device)
        self.model.load_state_dict(init_state)
        self.loss_fn = loss_fn
        self.train_set, self.eval_set = train_set, eval_set
        self.flat_grad = attach_flat_grad(self.model)
        # The all-reduced gradient is summed on the host; on CPU that is the flat buffer itself.
        self.host_grad = self.flat_grad if self.device.type == "cpu" else torch.empty_like(self.flat_grad, device="cpu")
        self.wire = ObjectStoreWire()
        self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr)
        self.schedule = make_schedule(config.schedule, self.optimizer, total_steps)

    def __repr__(self) -> str:
        # Ray calls this even for an actor whose __init__ failed half way.
        return f"Replica(rank={getattr(self, 'rank', '?')}, device={getattr(self, 'device', '?')})"

    def ready(self) -> dict:
        """Where this replica runs: answered once it is fully built."""
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device),
                "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
                "shared_memory": shared_memory_available()}  # judged where the replica runs

    @_reported
    @ray.method(num_returns=2)  # innermost: Ray reads it from the unwrapped function
    def run(self, plan: list, *grads: np.ndarray):
        """Follow the driver's plan: per step, apply the previous step's all-reduce, then compute
        the gradient of this replica's part of the batch (see plan.py for the format).

        Returns (this call's last gradient as the wire hands it over, the local mean loss of each
        step, None where this replica had no sample).
        """
        handoff, losses = None, []
        for indices, reduce in plan:
            if reduce is not None:
                self._apply(reduce, grads)
            handoff, loss = self._compute(indices)
            losses.append(loss)
        return handoff, losses

    @_reported
    def apply(self, reduce, *grads: np.ndarray) -> int:
        """Apply an all-reduce on its own (the epoch's last step); returns the steps applied."""
        self._apply(reduce, grads)
        return self.steps

    def _compute(self, indices: np.ndarray):
        if len(indices) == 0:
            return None, None
        x, y = (t.to(self.device, non_blocking=True) for t in fetch(self.train_set, indices))
        self.flat_grad.zero_()
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        # self.steps counts applied updates: the gradient computed now belongs to step self.steps
        return self.wire.publish(self.flat_grad, self.steps), loss.item()

    def _apply(self, reduce, grads) -> None:
        weights, routes = reduce
        items = [grads[route] if isinstance(route, int) else route for route in routes]
        weighted_sum([self.wire.read(item) for item in items], weights, out=self.host_grad)
        self.wire.applied(self.steps)
        if self.host_grad is not self.flat_grad:
            self.flat_grad.copy_(self.host_grad, non_blocking=True)
        self.optimizer.step()
        self.schedule.step()
        self.steps += 1

    def share_memory(self, prefix: str) -> list[str]:
        """Switch to the shared-memory wire (all replicas on one node); returns this replica's buffer paths."""
        self.wire = SharedMemoryWire(self.rank, self.host_grad.numel(), self.host_grad.numpy().dtype, prefix)
        return self.wire.paths

    def attach_peers(self, paths_by_rank: dict[int, list[str]], pids_by_rank: dict[int, int]) -> None:
        self.wire.attach(paths_by_rank, pids_by_rank)

    def unlink_shared(self) -> None:
        self.wire.unlink()

    @_reported
    def evaluate(self, indices: np.ndarray, chunk: int) -> float | None:
        """Mean loss over the eval samples at `indices`, in chunks of `chunk`; None if there are none."""
        if len(indices) == 0:
            return None
        self.model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(indices), chunk):
                part = indices[start:start + chunk]
                x, y = (t.to(self.device) for t in fetch(self.eval_set, part))
                total += self.loss_fn(self.model(x), y).item() * len(part)
        self.model.train()
        return total / len(indices)

    def memory(self) -> dict[str, int]:
        """Bytes this replica holds: its buffers by size, and its measured memory above the baseline."""
        grad = self.flat_grad.numel() * self.flat_grad.element_size()
        return {
            "params": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            "grad": grad,
            "optimizer": sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                             for t in state.values() if torch.is_tensor(t)),
            "wire_buffers": 2 * grad if self.wire.kind == "shared_memory" else 0,
            "pss_above_baseline": proportional_set_size() - self.baseline_pss,
        }

    def state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict, on CPU."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def digest(self) -> str:
        """SHA-256 of the parameters' bytes: equal digests mean bit-identical replicas."""
        h = hashlib.sha256()
        for p in self.model.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
