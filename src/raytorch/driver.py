"""The driver: builds the starting point, runs the epoch loop, all-reduces through itself.

    from raytorch import Trainer, TrainConfig
    result = Trainer(TrainConfig(workers=2), model_fn=..., dataset_fn=..., loss_fn=...).fit()
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import ray
import torch
from torch import nn

from .cluster import ray_session
from .config import TrainConfig
from .errors import ConfigError
from .group import gather, replica_group
from .plan import plan_steps, steps_per_call
from .reduce import weighted_mean
from .report import Progress, RunDir, epoch_line, final_line, is_scalar_linear, summary_line
from .sharding import epoch_order, global_batches, split_batch, steps_per_epoch

# Calls the driver submits ahead of the losses it has gathered: Ray's per-call latency then
# overlaps with the replicas' compute instead of stalling every step.
CALLS_IN_FLIGHT = 4


@dataclass(frozen=True)
class TrainResult:
    """What fit() returns."""

    epoch_losses: list[float]
    """Mean train loss of each epoch, sample-weighted, computed before each step's update."""
    eval_losses: list[float]
    """Eval loss after each epoch (empty without an eval set)."""
    model: nn.Module
    """The trained model, on CPU."""
    steps: int
    samples: int
    wall_time_s: float
    replica_digests: list[str] = field(default_factory=list)
    """SHA-256 of each replica's parameters at the end: all equal, or the replicas diverged."""
    epoch_times_s: list[float] = field(default_factory=list)
    """Wall time of each epoch's steps (without its evaluation)."""
    time_to_first_step_s: float = 0.0
    """From the call to fit() to the first step's losses back in the driver."""
    replica_memory: list[dict] = field(default_factory=list)
    """Per replica at the end: bytes of params, grad, optimizer state, wire buffers, and its
    proportional set size above the process's PyTorch baseline."""

    @property
    def eval_loss(self) -> Optional[float]:
        return self.eval_losses[-1] if self.eval_losses else None


class Trainer:
    """Data-parallel training of `model_fn()` on `dataset_fn()` over config.workers Ray replicas."""

    def __init__(self, config: TrainConfig, *, model_fn: Callable[[], nn.Module], dataset_fn: Callable,
                 loss_fn: Callable, eval_dataset_fn: Optional[Callable] = None, quiet: bool = False):
        self.config, self.model_fn, self.loss_fn = config, model_fn, loss_fn
        self.dataset_fn, self.eval_dataset_fn = dataset_fn, eval_dataset_fn
        self.quiet = quiet

    def fit(self) -> TrainResult:
        self._fit_started = time.perf_counter()
        config = self.config
        config.validate()
        train_set = self.dataset_fn()
        eval_set = self.eval_dataset_fn() if self.eval_dataset_fn else None
        steps = steps_per_epoch(len(train_set), config.batch_size, config.drop_last)
        if steps == 0:
            raise ConfigError("batch_size", f"{config.batch_size} exceeds the {len(train_set)} training samples "
                                            f"with drop_last: no step would run; lower batch_size")
        # The contract's starting point: model_fn() right after torch.manual_seed(seed).
        torch.manual_seed(config.seed)
        model = self.model_fn()
        init_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        run_name = f"raytorch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        metadata = {"job_name": run_name, "raytorch_config": json.dumps(config.to_dict())}
        with ray_session(config.address, metadata) as session:
            self._say(f"Ray at {session.gcs_address}" + (f", dashboard {session.dashboard_url}" if session.dashboard_url else ""))
            with replica_group(
                config, run_name, model_fn=self.model_fn, loss_fn=self.loss_fn,
                init_state=ray.put(init_state), train_set=ray.put(train_set),
                eval_set=ray.put(eval_set) if eval_set is not None else None, total_steps=steps * config.epochs,
            ) as (replicas, infos):
                for info in infos:
                    self._say(f"replica-{info['rank']}: {info['device']}, node {info['node_id'][:12]}, pid {info['pid']}, "
                              f"gradients via {info['wire']}")
                result = self._train(replicas, infos[0]["wire"], len(train_set),
                                     len(eval_set) if eval_set is not None else 0,
                                     scalar_linear=is_scalar_linear(init_state))
        model.load_state_dict(result.pop("state"))
        return TrainResult(model=model, **result)

    def _train(self, replicas: list, wire: str, train_size: int, eval_size: int, scalar_linear: bool) -> dict:
        """The epoch loop: split each batch, replicas compute, all-reduce, step, gather losses, log."""
        config, workers = self.config, len(replicas)
        run_dir = RunDir(config.output_dir) if config.output_dir else None
        if run_dir:
            run_dir.write_config(config)
        progress = Progress(enabled=not self.quiet)
        epoch_losses, eval_losses, epoch_times = [], [], []
        steps_done = samples_done = 0
        first_step_s = step_time = 0.0
        started = time.perf_counter()
        for epoch in range(config.epochs):
            epoch_started = time.perf_counter()
            pending: deque = deque()  # per call: (loss refs, part sizes per step), oldest first
            losses, counts = [], []
            carry, carried = None, []  # the last planned all-reduce, and the gradient refs it routes to
            batches = global_batches(epoch_order(train_size, config.seed, epoch, config.shuffle),
                                     config.batch_size, config.drop_last)
            progress.start(epoch, len(batches))
            done = 0
            while done < len(batches):
                chunk = batches[done:done + steps_per_call(wire, step_time)]
                # split each batch: contiguous near-equal parts, part r to replica r, and plan the
                # all-reduce of each step: weights n_r / n and a route to every replica's gradient
                plans, sizes, carry = plan_steps(chunk, workers, carry, wire, steps_done)
                # replicas follow their plans: apply the previous all-reduce, compute their gradient
                calls = [r.run.remote(plan, *carried) for r, plan in zip(replicas, plans)]
                # all-reduce through the driver: the next call gets the last step's gradients (by
                # reference on the object-store wire; by (rank, step) from shared memory otherwise)
                carried = [calls[r][0] for r, n in enumerate(sizes[-1]) if n] if wire == "object_store" else []
                # gather losses a few calls behind, so the driver never stalls the replicas
                pending.append(([c[1] for c in calls], sizes))
                if not steps_done:  # the first step, waited for: time to first step
                    gather(replicas, pending[0][0])
                    first_step_s = time.perf_counter() - self._fit_started
                while len(pending) > CALLS_IN_FLIGHT:
                    _collect(replicas, pending.popleft(), losses, counts, progress)
                    step_time = (time.perf_counter() - epoch_started) / len(losses)
                done += len(chunk)
                steps_done += len(chunk)
                samples_done += sum(len(b) for b in chunk)
            # step: every replica applies the epoch's last all-reduce
            applied = [r.apply.remote(carry, *carried) for r in replicas]
            while pending:
                _collect(replicas, pending.popleft(), losses, counts, progress)
            gather(replicas, applied)
            progress.close()
            epoch_losses.append(weighted_mean(losses, counts))
            epoch_times.append(time.perf_counter() - epoch_started)
            # evaluate: each replica scores a contiguous part of the eval set
            if eval_size:
                eval_parts = split_batch(torch.arange(eval_size), workers)
                scores = gather(replicas, [r.evaluate.remote(p.numpy(), config.batch_size)
                                           for r, p in zip(replicas, eval_parts)])
                eval_losses.append(weighted_mean([s or 0.0 for s in scores], [len(p) for p in eval_parts]))
            # log: the seed's line, and a metrics record
            state = gather(replicas, [replicas[0].state.remote()])[0] if scalar_linear else None
            self._say(epoch_line(epoch, epoch_losses[-1], state, eval_losses[-1] if eval_losses else None))
            if run_dir:
                run_dir.log({"epoch": epoch, "loss": epoch_losses[-1],
                             "eval_loss": eval_losses[-1] if eval_losses else None, "steps": steps_done,
                             "samples": samples_done, "epoch_time_s": epoch_times[-1],
                             "samples_per_s": sum(counts) / epoch_times[-1]})
        wall = time.perf_counter() - started
        if eval_losses:
            self._say(final_line(eval_losses[-1]))
        self._say(summary_line(epoch_losses[-1], eval_losses[-1] if eval_losses else None, steps_done,
                               samples_done, wall, workers))
        digests = gather(replicas, [r.digest.remote() for r in replicas])
        memory = gather(replicas, [r.memory.remote() for r in replicas])
        if len(set(digests)) != 1:
            self._say(f"WARNING: replicas hold different parameters at the end (digests {digests})")
        state = gather(replicas, [replicas[0].state.remote()])[0]
        return dict(epoch_losses=epoch_losses, eval_losses=eval_losses, steps=steps_done, samples=samples_done,
                    wall_time_s=wall, replica_digests=digests, epoch_times_s=epoch_times,
                    time_to_first_step_s=first_step_s, replica_memory=memory, state=state)

    def _say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)


def _collect(replicas: list, entry: tuple, losses: list, counts: list, progress: Progress) -> None:
    """Turn one call's per-replica loss lists into per-step sample-weighted losses."""
    refs, sizes_per_step = entry
    per_replica = gather(replicas, refs)
    first = len(losses)
    for step, sizes in enumerate(sizes_per_step):
        active = [r for r, n in enumerate(sizes) if n]
        losses.append(weighted_mean([per_replica[r][step] for r in active], [sizes[r] for r in active]))
        counts.append(sum(sizes))
    progress.advance(len(sizes_per_step), sum(counts[first:]),
                     sum(loss * n for loss, n in zip(losses[first:], counts[first:])))
