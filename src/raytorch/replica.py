"""Replica: one model replica, its optimizer and its loss on its own device, run as a Ray actor.

The class is plain Python (tests build it in-process); the driver runs it with ray.remote.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import time
import warnings
from collections import deque
from typing import Callable

import numpy as np
import ray
import torch
from torch import nn

from .config import TrainConfig
from .data import fetch
from .device import autocast, replica_device, torch_threads
from .errors import NonFiniteError, PeerError, ReplicaError
from .optim import make_optimizer, make_schedule
from .reduce import weighted_sum
from .telemetry import ReplicaMetrics
from .wire import ObjectStoreWire, PeerFailed, SharedMemoryWire, shared_memory_available

# Global losses of the last steps this replica applied: what the driver had not gathered yet
# when a peer died comes from here (calls in flight hold far fewer steps).
LOSS_LOG_STEPS = 4096


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
                 loss_fn: Callable, init_state: dict, train_set, eval_set, total_steps: int, run_name: str = ""):
        self.rank, self.run_name = rank, run_name  # rank names the replica (replica-<rank>) for good
        import torch._dynamo  # noqa: F401  (any torch.optim optimizer imports it: ~70 MB of PyTorch's own)

        self.baseline_pss = proportional_set_size()  # this process with PyTorch loaded, before any model
        torch.set_num_threads(torch_threads(config.cpus_per_replica))
        self.steps = 0
        self.on_nonfinite = config.on_nonfinite
        self.loss_log: deque = deque(maxlen=LOSS_LOG_STEPS)  # (step, global loss) per applied step
        self.computing_since = None  # set while a step's forward and backward run
        self.metrics = ReplicaMetrics(run_name, f"replica-{rank}") if ray.is_initialized() else None
        self.device = replica_device(config.device_of(rank))
        self.model = model_fn().to(self.device)
        self.model.load_state_dict(init_state)
        self.loss_fn = loss_fn
        self.train_set, self.eval_set = train_set, eval_set
        self.flat_grad = attach_flat_grad(self.model)
        # The all-reduced gradient is summed on the host; on CPU that is the flat buffer itself.
        # On a GPU, gradients cross to the host through pinned buffers (copies without blocking the
        # host): `staging` takes this replica's gradient out, `host_grad` brings the reduced one back.
        on_cpu = self.device.type == "cpu"
        self.host_grad, self.staging = ((self.flat_grad, self.flat_grad) if on_cpu else
                                        (torch.empty(self.flat_grad.shape, dtype=self.flat_grad.dtype, pin_memory=True),
                                         torch.empty(self.flat_grad.shape, dtype=self.flat_grad.dtype, pin_memory=True)))
        self.wire = ObjectStoreWire()
        self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr, config.weight_decay)
        self.grad_clip, self.accumulate = config.grad_clip, config.accumulate
        self.precision = config.precision
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        if self.scaler is not None:
            self.scaler.scale(torch.ones((), device=self.device))  # creates its scale now: a replica may sit out step 0
        self.schedule = make_schedule(config.schedule, self.optimizer, total_steps, config.warmup_steps)
        # A skipped update (fp16 overflow, on_nonfinite 'skip') still steps the schedule, on purpose:
        # PyTorch's warning about a schedule step without an optimizer step does not apply.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")

    def __repr__(self) -> str:
        # Ray calls this even for an actor whose __init__ failed half way.
        return (f"Replica(rank={getattr(self, 'rank', '?')}, device={getattr(self, 'device', '?')}, "
                f"run={getattr(self, 'run_name', '?')})")

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

        Returns (this call's last gradient as the wire hands it over, (the local mean loss of each
        step, None where this replica had no sample; per step, the seconds its forward and backward
        took and the seconds of its other own work: the driver's measure of this replica's speed)).
        """
        handoff, losses, seconds = None, [], []
        reducing, applied = 0.0, 0
        for indices, reduce, share in plan:
            started, waited = time.monotonic(), self.wire.waited
            if reduce is not None:
                reducing += self._apply(reduce, grads)
                applied += 1
            handoff, loss = self._compute(indices, share)
            # this replica's own work on the step, waits for peers left out: the part that grows
            # with its samples (forward and backward) and the part that does not (all-reduce, step)
            busy = time.monotonic() - started - (self.wire.waited - waited)
            seconds.append((self.compute_s, max(0.0, busy - self.compute_s)))
            losses.append(loss)
        if self.metrics and applied:
            self.metrics.allreduced(reducing / applied)
        return handoff, (losses, seconds)

    @_reported
    def apply(self, reduce, *grads: np.ndarray) -> int:
        """Apply an all-reduce on its own (the epoch's last step); returns the steps applied."""
        self._apply(reduce, grads)
        return self.steps

    def _compute(self, indices: np.ndarray, share: float):
        if len(indices) == 0:
            self.compute_s = 0.0
            return None, None
        self.computing_since = time.monotonic()
        self.flat_grad.zero_()
        value = 0.0
        # accumulate > 1: the part in micro-batches, each weighted by its share of the part, so the
        # summed gradient is the part's mean-loss gradient, as one pass would give
        for micro in np.array_split(indices, min(self.accumulate, len(indices))):
            x, y = (t.to(self.device, non_blocking=True) for t in fetch(self.train_set, micro))
            with autocast(self.device, self.precision):
                loss = self.loss_fn(self.model(x), y) * (len(micro) / len(indices))
            if self.scaler is None:
                loss.backward()
            else:
                # fp16: backward of this replica's part of the global mean loss, times the loss scale,
                # so its fp16 gradients have the magnitudes one process's would (and overflow alike);
                # the all-reduce is then a plain sum, unscaled by the scaler (see _apply)
                (self.scaler.scale(loss) * share).backward()
            value += loss.item()
        value = self._checked(value)
        self.compute_s = time.monotonic() - self.computing_since  # before any wait for peers
        self.computing_since = None
        if self.staging is not self.flat_grad:
            self.staging.copy_(self.flat_grad, non_blocking=True)
            # also orders any earlier host-to-device copy of host_grad before it is written again
            torch.cuda.current_stream(self.device).synchronize()
        # self.steps counts applied updates: the gradient computed now belongs to step self.steps
        return self.wire.publish(self.staging, self.steps, value), value

    def _checked(self, loss: float) -> float:
        """The local loss; NaN when the gradient is not finite, so that peers see it too. Raises
        NonFiniteError instead with on_nonfinite 'stop'."""
        # One reduction over the gradient: NaN and inf propagate through a sum (it also flags a
        # gradient whose sum overflows float32: a run that far gone has diverged anyway).
        # With fp16 an overflowing gradient is the loss scaler's business: it skips that step.
        what = (f"loss {loss}" if not math.isfinite(loss)
                else None if self.scaler is not None or torch.isfinite(self.flat_grad.sum())
                else "gradient with NaN or inf")
        if what is None:
            return loss
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"replica {self.rank}: non-finite {what} at step {self.steps}")
        return math.nan

    def _apply(self, reduce, grads) -> float:
        """Sum the routed gradients, step; returns the seconds the all-reduce took (waits included)."""
        started = time.perf_counter()
        weights, routes = reduce
        items = [grads[route] if isinstance(route, int) else route for route in routes]
        parts = [self.wire.read(item) for item in items]
        loss = sum(w * part_loss for w, (_, part_loss) in zip(weights, parts))
        # fp16 gradients arrive weighted by their share already (see _compute): sum them
        summed = [1.0] * len(weights) if self.scaler is not None else weights
        weighted_sum([grad for grad, _ in parts], summed, out=self.host_grad)
        reduced = time.perf_counter() - started
        self.wire.applied(self.steps)
        self.loss_log.append((self.steps, loss))
        if math.isfinite(loss):  # the same test on the same numbers: every replica decides alike
            if self.host_grad is not self.flat_grad:
                self.flat_grad.copy_(self.host_grad, non_blocking=True)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # the true gradient, for clipping and the overflow check
            if self.grad_clip is not None:  # on the reduced gradient: the same on every replica
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if self.scaler is None:
                self.optimizer.step()
            else:  # step unless the (same, everywhere) reduced gradient overflowed; adapt the scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
        # else on_nonfinite 'skip' (a 'stop' raised in _compute): drop the update, keep the schedule
        self.schedule.step()
        self.steps += 1
        return reduced

    def share_memory(self, prefix: str, position: int) -> list[str]:
        """Switch to (fresh) shared-memory wire buffers at `position` among the replicas (all on one
        node); returns this replica's buffer paths."""
        self.wire = SharedMemoryWire(position, self.host_grad.numel(), self.host_grad.numpy().dtype, prefix,
                                     step=self.steps)
        return self.wire.paths

    def adopt(self, rank: int) -> None:
        """A spare takes the place of replica `rank` (its state comes next, by restore)."""
        self.rank = rank
        if self.metrics:
            self.metrics = ReplicaMetrics(self.run_name, f"replica-{rank}")

    def use_object_store(self) -> None:
        """Hand gradients over as Ray objects (replicas on several nodes)."""
        self.wire = ObjectStoreWire()

    def position(self) -> int:
        """Steps applied, answered after the calls queued before this one."""
        return self.steps

    def attach_peers(self, paths_by_rank: dict[int, list[str]], pids_by_rank: dict[int, int]) -> None:
        self.wire.attach(paths_by_rank, pids_by_rank)

    def unlink_shared(self) -> None:
        self.wire.unlink()

    @_reported
    def evaluate(self, indices: np.ndarray, chunk: int) -> tuple[float | None, float | None]:
        """Mean loss over the eval samples at `indices`, in chunks of `chunk`, and, for a classifier
        (outputs of shape (n, classes) against integer labels), the fraction classified right.
        (None, None) where there are no samples."""
        if len(indices) == 0:
            return None, None
        self.model.eval()
        total, correct, classifier = 0.0, 0, True
        with torch.no_grad(), autocast(self.device, self.precision):
            for start in range(0, len(indices), chunk):
                part = indices[start:start + chunk]
                x, y = (t.to(self.device) for t in fetch(self.eval_set, part))
                output = self.model(x)
                total += self.loss_fn(output, y).item() * len(part)
                classifier = classifier and output.dim() == 2 and output.shape[1] > 1 and not y.is_floating_point()
                if classifier:
                    correct += (output.argmax(dim=1) == y).sum().item()
        self.model.train()
        return total / len(indices), (correct / len(indices) if classifier else None)

    @ray.method(concurrency_group="health")  # its own thread: answers while a step runs or waits
    def ping(self) -> dict:
        """Liveness and progress: steps applied, and for how long the current step has computed."""
        since = self.computing_since
        return {"steps": self.steps, "computing_s": None if since is None else time.monotonic() - since}

    @ray.method(concurrency_group="health")
    def abandon(self, position: int) -> None:
        """The peer at wire position `position` was declared dead: stop waiting for it."""
        self.wire.abandon(position)

    def snapshot(self, losses_since: int = 0) -> dict:
        """Everything the next steps depend on: weights, optimizer and schedule state, RNG, the step
        count; and the global losses of the applied steps from `losses_since` on (as many as kept)."""
        return {
            "model": self.state(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "steps": self.steps,
            "losses": {step: loss for step, loss in self.loss_log if step >= losses_since},
        }

    @_reported
    def restore(self, snapshot: dict) -> int:
        """Become the replica that took `snapshot`; returns its step count."""
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.schedule.load_state_dict(snapshot["schedule"])
        torch.set_rng_state(snapshot["rng"])
        if self.scaler is not None and snapshot.get("scaler"):
            self.scaler.load_state_dict(snapshot["scaler"])
        self.steps = snapshot["steps"]
        self.loss_log.clear()
        return self.steps

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
