"""Replica: one model replica as a Ray actor: its Learner (the PyTorch half), the wire its
gradients travel on, and the driver's plan followed step by step.

The class is plain Python (tests build it in-process); the replica group runs it with ray.remote.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections import deque
from typing import Callable, Optional

import numpy as np
import ray
import torch
from torch import nn

from ..config.schema import TrainConfig
from ..core.naming import replica_name
from ..core.snapshot import Snapshot
from ..errors import NonFiniteError, PeerError, ReplicaError
from ..wire.object_store import ObjectStoreWire
from ..wire.protocol import PeerFailed, Wire
from ..wire.sharded import ShardedUpdate, release
from .device import replica_device
from .learner import Learner
from .metrics import ReplicaMetrics
from .process import assigned_gpus, measured_memory, peak_bytes, prepare_process, to_actor_log
from .replies import Liveness, ReplicaInfo, RunReport, Score, StepSeconds
from .wiring import collective_rendezvous, collective_wire, shared_memory_report, shared_wire

# Global losses of the last steps this replica applied: what the driver had not gathered yet
# when a peer died comes from here (calls in flight hold far fewer steps).
LOSS_LOG_STEPS = 4096


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
                f"replica {self.rank} failed in {method.__name__} after {self.steps} steps: {type(e).__name__}: {e}",
                rank=self.rank, step=self.steps) from e

    return wrapper


class Replica:
    """Holds one replica; per step computes its part's gradient, then applies the all-reduced one."""

    def __init__(self, rank: int, config: TrainConfig, model_fn: Callable[[], nn.Module],
                 loss_fn: Optional[Callable], init_state: dict, train_set, eval_set, total_steps: int,
                 run_name: str = "", **user_fns: Optional[Callable]):
        """user_fns: step_fn, optimizer_fn, schedule_fn, collate_fn where given (see Learner)."""
        self.rank, self.run_name = rank, run_name  # rank names the replica (replica-<rank>) for good
        self.baseline = prepare_process(config.cpus_per_replica)  # this process before any model
        self.steps = 0  # updates applied: the gradient computed next belongs to this global step
        self.computed, self.redone = -1, 0  # the latest step it computed a gradient of; those computed again
        self.on_nonfinite = config.on_nonfinite
        self.loss_log: deque = deque(maxlen=LOSS_LOG_STEPS)  # (step, global loss) per applied step
        self.metrics = ReplicaMetrics(run_name, replica_name(rank)) if ray.is_initialized() else None
        device = replica_device(config.device_of(rank), assigned_gpus())
        self.learner = Learner(config, device, model_fn, loss_fn, init_state, train_set, eval_set, total_steps,
                               **user_fns)
        self.wire: Wire = ObjectStoreWire()  # how its gradients travel: the group sets the wire up
        self.sharded: Optional[ShardedUpdate] = None  # its update, where it is sharded (wire/sharded.py)

    # the learner's parts that callers look at
    model = property(lambda self: self.learner.model)
    scaler = property(lambda self: self.learner.scaler)
    device = property(lambda self: self.learner.device)

    def __repr__(self) -> str:
        device = getattr(getattr(self, "learner", None), "device", "?")  # Ray calls this where __init__ failed too
        return f"Replica(rank={getattr(self, 'rank', '?')}, device={device}, run={getattr(self, 'run_name', '?')})"

    def ready(self) -> ReplicaInfo:
        """Where this replica runs: answered once it is fully built."""
        return ReplicaInfo(rank=self.rank, pid=os.getpid(), device=str(self.device),
                           node_id=ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
                           **shared_memory_report(self.learner))  # judged where the replica runs

    @_reported
    @ray.method(num_returns=2)  # innermost: Ray reads it from the unwrapped function
    def run(self, plan: list, *grads: np.ndarray) -> tuple[object, RunReport]:
        """Follow the driver's plan: per step, apply the previous step's all-reduce, then compute
        the gradient of this replica's part of the batch (see core/callplan.py for the format).

        Returns this call's last gradient as the wire hands it over, and the call's RunReport.
        """
        handoff, losses, seconds = None, [], []
        reducing, applied = 0.0, 0
        for step, (indices, reduce, share) in enumerate(plan):
            if step + 1 < len(plan):  # the next step's samples, fetched while this one computes
                self.learner.ahead(plan[step + 1][0], self.steps + (reduce is not None) + 1)
            started, waited = time.monotonic(), self.wire.waited
            if reduce is not None:
                reducing += self._apply(reduce, grads)
                applied += 1
            handoff, loss, compute_s = self._compute(indices, share)
            # this replica's own work on the step, waits for peers left out: the part that grows
            # with its samples (forward and backward) and the part that does not (all-reduce, step)
            busy = time.monotonic() - started - (self.wire.waited - waited)
            seconds.append(StepSeconds(compute_s, max(0.0, busy - compute_s)))
            losses.append(loss)
        if self.metrics and applied:
            self.metrics.allreduced(reducing / applied, peak_bytes(self.device))
        return handoff, RunReport(losses, seconds, self.learner.draws.untold())

    @_reported
    def apply(self, reduce, *grads: np.ndarray) -> int:
        """Apply an all-reduce on its own (the epoch's last step); returns the steps applied."""
        self._apply(reduce, grads)
        return self.steps

    def _compute(self, indices: np.ndarray, share: float) -> tuple[object, Optional[float], float]:
        """This step's gradient over `indices`, published: (the handoff, the local loss, compute
        seconds). The loss is NaN where it or the gradient is not finite, so that peers see it too
        (on_nonfinite 'stop' raises NonFiniteError instead)."""
        if len(indices) == 0 and not self.learner.full:
            return None, None, 0.0
        into = self.wire.target(self.steps)
        self.redone += self.steps <= self.computed  # after a loss: a step this replica had computed already
        self.computed = max(self.computed, self.steps)
        loss, what = self.learner.gradient(indices, share, into, self.steps)
        if what is not None and len(indices):
            if self.on_nonfinite == "stop":
                raise NonFiniteError(f"replica {self.rank}: non-finite {what} at step {self.steps}", rank=self.rank,
                                     step=self.steps)
            loss = math.nan
        if len(indices) == 0:  # fully sharded: it took part in FSDP2's collectives, with nothing to add
            return None, None, self.learner.compute_s
        return self.wire.publish(self.learner.staging if into is None else into, self.steps, loss), loss, \
            self.learner.compute_s

    def _apply(self, reduce, grads) -> float:
        """Sum the routed gradients, step; returns the seconds the all-reduce took (waits included)."""
        weights, routes = reduce
        items = [grads[route] if isinstance(route, int) else route for route in routes]
        # fp16 gradients, and any on the collective wire, arrive weighted by their share already
        # (see Learner.gradient): sum them
        summed = [1.0] * len(weights) if self.scaler is not None or self.learner.prescaled else weights
        shard = None
        with self.learner.profiler.phase("allreduce", self.steps) as reduced:
            if self.sharded is None:
                loss = self.wire.all_reduce(items, summed, weights, out=self.learner.host_grad)
            else:  # this replica's chunk of the gradient only: it steps that chunk of the parameters
                loss, chunk = self.wire.reduce_scatter(items, summed, weights)
                shard = functools.partial(self.sharded.apply, self.wire, self.steps, chunk)
        self.wire.applied(self.steps)  # the peers' gradients are read: their buffers are free again
        self.loss_log.append((self.steps, loss))
        # a non-finite loss (on_nonfinite 'skip'; 'stop' raised in _compute): drop the update
        self.learner.update(finite=math.isfinite(loss), step=self.steps, shard=shard)
        self.steps += 1
        return reduced.seconds

    def share_memory(self, prefix: str, position: int, world: int) -> tuple[list[str], Optional[str]]:
        """Switch to fresh shared-memory buffers at `position` among `world` replicas on one node;
        returns this replica's buffer paths, and why its update is not sharded (None: it is; wire/sharded.py)."""
        getattr(self.wire, "unlink", lambda: None)()  # names of a set-up a lost peer broke off go too
        wire, sharded, unsharded = shared_wire(self.learner, prefix, position, world, self.steps)
        self._use(wire, sharded)
        return wire.paths, unsharded

    def _use(self, wire, sharded=None) -> None:
        """Hand gradients over on `wire` from now on, unweighted, updated whole unless `sharded`."""
        release(self.sharded)
        self.wire, self.sharded = wire, sharded
        self.learner.prescaled, self.learner.grads.on_ready = False, None

    def adopt(self, rank: int) -> None:
        """A spare takes the place of replica `rank` (its state comes next, by restore)."""
        self.rank = rank
        if self.metrics:
            self.metrics = ReplicaMetrics(self.run_name, replica_name(rank))

    def use_object_store(self) -> None:
        """Hand gradients over as Ray objects (replicas on several nodes)."""
        self._use(ObjectStoreWire())

    def rendezvous(self) -> tuple[str, int]:
        """An address of this replica's node and a port free there: where a collective group meets."""
        return collective_rendezvous()

    def join_collective(self, position: int, world: int, address: str, port: int, timeout_s: float,
                        backend: str = "gloo", grad_dtype: str = "fp32") -> None:
        """Switch to a (fresh) collective group (wiring.collective_wire)."""
        self._use(ObjectStoreWire())  # the model its own again, and the wire's settings reset
        self.wire = collective_wire(self.learner, position, world, address, port, timeout_s, backend, grad_dtype)

    def position(self) -> int:
        """Steps applied, answered after the calls queued before this one."""
        return self.steps

    def attach_peers(self, paths_by_rank: dict[int, list[str]], pids_by_rank: dict[int, int]) -> None:
        self.wire.attach(paths_by_rank, pids_by_rank)

    def unlink_shared(self) -> None:
        self.wire.unlink()

    @_reported
    def evaluate(self, indices: np.ndarray, chunk: int, rounds: int = 0) -> Score:
        """Eval loss (and a classifier's accuracy) over the eval samples at `indices` (Learner.evaluate)."""
        return Score(*self.learner.evaluate(indices, chunk, rounds))

    @ray.method(concurrency_group="health")  # its own thread: answers while a step runs or waits
    def ping(self, progress: str = "") -> Liveness:
        """Liveness: steps applied, how long the current step has computed; `progress`: a line for this actor's log."""
        to_actor_log(progress)
        since = self.learner.computing_since
        return Liveness(self.steps, None if since is None else time.monotonic() - since, self.redone)

    @ray.method(concurrency_group="health")
    def abandon(self, position: int) -> None:
        """The peer at wire position `position` was declared dead: stop waiting for it."""
        self.wire.abandon(position)

    def snapshot(self, losses_since: int = 0) -> Snapshot:
        """Everything the next steps depend on, with the global losses of the applied steps from
        `losses_since` on (as many as kept)."""
        return self.learner.snapshot(self.steps, {step: loss for step, loss in self.loss_log if step >= losses_since})

    @_reported
    def restore(self, snapshot: Snapshot) -> int:
        """Become the replica that took `snapshot`; returns its step count."""
        release(self.sharded)  # the state goes into parameters of this replica's own
        self.learner.restore(snapshot)
        self.steps = snapshot.steps
        self.loss_log.clear()
        return self.steps

    def profile(self) -> dict:
        """Its rank, the profiled steps' seconds per phase and their trace (profile_steps; StepProfiler.report)."""
        return {"rank": self.rank, **self.learner.profiler.report()}

    def memory(self) -> dict[str, int]:
        """Bytes this replica holds, by kind, and its measured memory (process.measured_memory)."""
        return {**self.learner.memory(), "wire_buffers": self.wire.buffer_bytes, **measured_memory(self.baseline,
                                                                                                    self.device)}

    def state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict, on CPU."""
        return self.learner.state()

    def digest(self) -> str:
        """SHA-256 of the parameters' bytes: equal digests mean bit-identical replicas."""
        return self.learner.digest()
