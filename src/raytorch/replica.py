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
from .errors import ReplicaError
from .optim import make_optimizer, make_schedule
from .reduce import weighted_sum


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


def _reported(method):
    """Re-raise a failure inside a replica as a ReplicaError naming the replica and its step."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except ReplicaError:
            raise
        except Exception as e:
            raise ReplicaError(
                f"replica {self.rank} failed in {method.__name__} after {self.steps} steps: {type(e).__name__}: {e}"
            ) from e

    return wrapper


class Replica:
    """Holds one replica; per step computes its part's gradient, then applies the all-reduced one."""

    def __init__(self, rank: int, config: TrainConfig, model_fn: Callable[[], nn.Module],
                 loss_fn: Callable, init_state: dict, train_set, eval_set, total_steps: int):
        torch.set_num_threads(torch_threads(config.cpus_per_replica))
        self.rank = rank
        self.steps = 0
        self.device = replica_device(config.device)
        self.model = model_fn().to(self.device)
        self.model.load_state_dict(init_state)
        self.loss_fn = loss_fn
        self.train_set, self.eval_set = train_set, eval_set
        self.flat_grad = attach_flat_grad(self.model)
        # The all-reduced gradient is summed on the host; on CPU that is the flat buffer itself.
        self.host_grad = self.flat_grad if self.device.type == "cpu" else torch.empty_like(self.flat_grad, device="cpu")
        self.scratch = np.empty(self.flat_grad.numel(), dtype=self.host_grad.numpy().dtype)
        self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr)
        self.schedule = make_schedule(config.lr_schedule, self.optimizer, total_steps)

    def __repr__(self) -> str:
        return f"Replica(rank={self.rank}, device={self.device})"

    def ready(self) -> dict:
        """Where this replica runs: answered once it is fully built."""
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device),
                "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None}

    @_reported
    @ray.method(num_returns=2)  # innermost: Ray reads it from the unwrapped function
    def step(self, indices: np.ndarray, weights: list[float] | None = None, *grads: np.ndarray):
        """Apply the previous step's all-reduced gradient (if given), then compute this part's.

        Returns (flat gradient of the local mean loss, local mean loss), or (None, None) when
        this replica has no sample in the batch.
        """
        if weights is not None:
            self._apply(weights, grads)
        if len(indices) == 0:
            return None, None
        x, y = (t.to(self.device, non_blocking=True) for t in fetch(self.train_set, indices))
        self.flat_grad.zero_()
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return self.flat_grad.detach().cpu().numpy(), loss.item()

    @_reported
    def apply(self, weights: list[float], *grads: np.ndarray) -> int:
        """Apply an all-reduced gradient: sum the weighted replica gradients and step."""
        self._apply(weights, grads)
        return self.steps

    def _apply(self, weights, grads) -> None:
        weighted_sum(grads, weights, out=self.host_grad.numpy(), scratch=self.scratch)
        if self.host_grad is not self.flat_grad:
            self.flat_grad.copy_(self.host_grad, non_blocking=True)
        self.optimizer.step()
        self.schedule.step()
        self.steps += 1

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

    def state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict, on CPU."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def digest(self) -> str:
        """SHA-256 of the parameters' bytes: equal digests mean bit-identical replicas."""
        h = hashlib.sha256()
        for p in self.model.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
