"""The driver: builds the starting point, runs the epoch loop, all-reduces through itself, and
recovers from lost replicas without leaving the loop.

    from raytorch import Trainer, TrainConfig
    result = Trainer(TrainConfig(workers=2), model_fn=..., dataset_fn=..., loss_fn=...).fit()
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import ray
import torch
from torch import nn

from . import checkpoint
from .cluster import ray_session
from .config import RUN_DEFINING, TrainConfig
from .errors import CheckpointError, ConfigError, NonFiniteError, ReplicaError
from .balance import SpeedEstimate
from .device import resolve_device
from .group import ReplicaGroup, ReplicaLost, replica_group
from .plan import plan_steps, steps_per_call
from .reduce import weighted_mean
from .report import Progress, RunDir, epoch_line, final_line, is_scalar_linear, restarts_line, summary_line
from .telemetry import RunMetrics
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
    restarts: list[dict] = field(default_factory=list)
    """Each loss of replicas: step, replicas, cause, replaced, dropped, seconds to the next step."""
    skipped_steps: list[int] = field(default_factory=list)
    """Steps whose update was skipped for a non-finite loss or gradient (on_nonfinite 'skip')."""
    resumed_from: Optional[int] = None
    """The global step of the checkpoint this run resumed from, if any."""
    eval_accuracies: list[float] = field(default_factory=list)
    """For a classifier: the fraction of the eval set classified right after each epoch."""
    replica_samples: dict[str, int] = field(default_factory=dict)
    """Training samples each replica computed on in this run (replica-<rank>: count): the split."""

    @property
    def eval_loss(self) -> Optional[float]:
        return self.eval_losses[-1] if self.eval_losses else None


@dataclass
class Position:
    """Where a run stands: `index` steps of epoch `epoch` done, and what was measured so far."""

    epoch: int = 0
    index: int = 0
    losses: list[float] = field(default_factory=list)  # per step of the current epoch
    counts: list[int] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    eval_accuracies: list[float] = field(default_factory=list)
    restarts: list[dict] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    best: Optional[float] = None  # early stopping: the best eval metric so far (lower is better)
    since_best: int = 0  # evaluations since it
    stopped: bool = False  # early-stopped: the run ends at `index` of `epoch`
    loss_sum: float = 0.0  # over the epoch's finite steps: sum of loss * samples, and the samples
    loss_samples: int = 0

    def add(self, loss: float, samples: int) -> None:
        self.losses.append(loss)
        self.counts.append(samples)
        if math.isfinite(loss):
            self.loss_sum += loss * samples
            self.loss_samples += samples

    def trim(self, steps: int) -> None:
        """Keep the epoch's first `steps` losses."""
        losses, counts = self.losses[:steps], self.counts[:steps]
        self.losses, self.counts, self.loss_sum, self.loss_samples = [], [], 0.0, 0
        for loss, samples in zip(losses, counts):
            self.add(loss, samples)

    def running_loss(self) -> Optional[float]:
        """The epoch's sample-weighted mean loss so far, non-finite (skipped) steps left out."""
        return self.loss_sum / self.loss_samples if self.loss_samples else None


class Trainer:
    """Data-parallel training of `model_fn()` on `dataset_fn()` over config.workers Ray replicas.

    resume_from: a run directory whose newest valid checkpoint the run continues from.
    """

    def __init__(self, config: TrainConfig, *, model_fn: Callable[[], nn.Module], dataset_fn: Callable,
                 loss_fn: Callable, eval_dataset_fn: Optional[Callable] = None, quiet: bool = False,
                 resume_from: Optional[str] = None):
        self.config, self.model_fn, self.loss_fn = config, model_fn, loss_fn
        self.dataset_fn, self.eval_dataset_fn = dataset_fn, eval_dataset_fn
        self.quiet, self.resume_from = quiet, resume_from

    def fit(self) -> TrainResult:
        self._fit_started, self._first_step_s, self._pending = time.perf_counter(), None, deque()
        config = self.config
        config.validate()
        if (config.eval_every or config.early_stop_patience) and self.eval_dataset_fn is None:
            raise ConfigError("eval_every" if config.eval_every else "early_stop_patience",
                              "needs an eval set: give eval_dataset_fn (or a dataset with one)")
        saved = self._load_checkpoint() if self.resume_from else None
        train_set = self.dataset_fn()
        eval_set = self.eval_dataset_fn() if self.eval_dataset_fn else None
        steps = steps_per_epoch(len(train_set), config.step_batch, config.drop_last)
        if steps == 0:
            raise ConfigError("batch_size", f"{config.step_batch} samples per step exceed the {len(train_set)} training "
                                            f"samples with drop_last: no step would run; lower batch_size (or accumulate)")
        limit = min(steps * config.epochs, config.max_steps or steps * config.epochs)  # steps in the run
        # The contract's starting point: model_fn() right after torch.manual_seed(seed).
        torch.manual_seed(config.seed)
        model = self.model_fn()
        init_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        run_name = f"raytorch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        metadata = {"job_name": run_name, "raytorch_config": json.dumps(config.to_dict())}
        with ray_session(config.address, metadata) as session:
            self._say(f"Run {run_name}: Ray at {session.gcs_address}"
                      + (f", dashboard http://{session.dashboard_url}" if session.dashboard_url else ""))
            resolved = resolve_device(config, ray.cluster_resources())
            if resolved is not config:
                self._say(f"device auto: {resolved.device}")
                self.config = config = resolved
            with replica_group(
                config, run_name, model_fn=self.model_fn, loss_fn=self.loss_fn,
                init_state=ray.put(init_state), train_set=ray.put(train_set),
                eval_set=ray.put(eval_set) if eval_set is not None else None, total_steps=limit,
            ) as group:
                for info in group.described():
                    self._say(f"replica-{info['rank']}: {info['device']}, node {info['node_id'][:12]}, pid {info['pid']}, "
                              f"gradients via {info['wire']}")
                if config.mixed_devices:
                    self._say("mixed devices: each device rounds its own way (other kernels, cuDNN's TF32), so this "
                              "run matches one process to float tolerance, not bit for bit"
                              + ("" if config.split == "adaptive" else "; --split adaptive would give each replica "
                                 "the share it can carry"))
                start = Position()
                if saved is not None:
                    start = self._restore(group, saved)
                self._metrics = RunMetrics(run_name)
                self._metrics.set(workers=len(group.actors))
                try:
                    result = self._train(group, start, len(train_set), len(eval_set) if eval_set is not None else 0,
                                         steps, limit, scalar_linear=is_scalar_linear(init_state))
                except ReplicaError:
                    self._drain(timeout=5.0)  # the calls still in flight fail too: take their errors quietly
                    raise
                finally:
                    self._metrics.close()
                    if self._run_dir:
                        self._run_dir.close()
        model.load_state_dict(result.pop("state"))
        if self._run_dir:
            torch.save(model.state_dict(), self._run_dir.path / "model.pt")
            plot = self._run_dir.plot()
            self._say(f"Loss curve: {plot}" if plot else "No loss curve drawn: it needs matplotlib "
                      "(pip install 'raytorch[plot]')")
        return TrainResult(model=model, resumed_from=saved["step"] if saved else None, **result)

    def _train(self, group: ReplicaGroup, at: Position, train_size: int, eval_size: int, steps: int, limit: int,
               scalar_linear: bool) -> dict:
        """The epoch loop: split each batch, replicas compute, all-reduce, step, gather losses, log;
        a lost replica is replaced and its step redone, inside the loop. `steps` per epoch, `limit`
        in the run."""
        config = self.config
        run_dir = self._run_dir
        self._eval_size, self._last_eval = eval_size, (None, None)
        if run_dir:
            run_dir.write_config(config)
        progress = Progress(enabled=not self.quiet)
        self._steps_per_epoch = steps
        epochs = -(-limit // steps)  # the last may be cut short by max_steps

        def batches_of(epoch: int) -> list:
            order = epoch_order(train_size, config.seed, epoch, config.shuffle)
            return global_batches(order, config.step_batch, config.drop_last)[:limit - epoch * steps]

        def samples_through(epoch: int) -> int:
            """Samples in epochs 0..epoch: whole epochs, then a cut one's full batches."""
            whole = min(epoch + 1, limit // steps)
            cut = limit - whole * steps if epoch + 1 > whole else 0
            per_epoch = steps * config.step_batch if config.drop_last else train_size
            return whole * per_epoch + cut * config.step_batch

        epoch_times = []
        started = time.perf_counter()
        self._step_time, self._recovering = 0.0, None
        self._speeds, self._shares, self._last_split = SpeedEstimate(len(group.actors)), None, None
        self._replica_samples: Counter[int] = Counter()  # by rank
        epoch_started = None
        while at.epoch < epochs:
            epoch = at.epoch
            batches = batches_of(epoch)
            if epoch_started is None:  # not again when the epoch goes on after a loss
                epoch_started = time.perf_counter()
            try:
                # the epoch's steps, from where the run stands (after a loss or a resume: mid-epoch)
                self._steps(group, at, batches, steps, progress)
                epoch_time = time.perf_counter() - epoch_started
                # evaluate: each replica scores a contiguous part of the eval set (an early stop
                # mid-epoch has just done so)
                eval_loss, accuracy = self._last_eval if at.stopped else self._evaluate(group)
                if not at.stopped and eval_loss is not None:
                    self._judge(at, eval_loss, accuracy, epoch * steps + len(batches))
                state = group.get([group.actors[0].state.remote()])[0] if scalar_linear else None
            except ReplicaLost as lost:
                # recover: replace the lost replicas, bring all to the most advanced survivor's step
                progress.close()
                self._recover(group, lost, at, batches, steps)
                continue
            # log: the seed's line, a metrics record, the dashboard's gauges
            running = at.running_loss()
            at.epoch_losses.append(math.nan if running is None else running)
            self._metrics.set(train_loss=running, eval_loss=eval_loss, eval_accuracy=accuracy)
            epoch_times.append(epoch_time)
            if eval_loss is not None:
                at.eval_losses.append(eval_loss)
            if accuracy is not None:
                at.eval_accuracies.append(accuracy)
            self._say(epoch_line(epoch, at.epoch_losses[-1], state, eval_loss, accuracy))
            done = epoch * steps + at.index  # all of the epoch's steps, unless stopped early
            samples_done = samples_through(epoch - 1) + sum(at.counts)
            if run_dir:
                run_dir.log({"event": "epoch", "epoch": epoch, "loss": at.epoch_losses[-1], "eval_loss": eval_loss,
                             "eval_accuracy": accuracy, "steps": done, "samples": samples_done,
                             "epoch_time_s": epoch_time, "samples_per_s": sum(at.counts) / epoch_time})
            if at.stopped:
                break
            # checkpoint: the next epoch starts from here
            at.epoch, at.index = epoch + 1, 0
            at.trim(0)
            epoch_started = None
            if run_dir:
                self._checkpoint(group, at)
        wall = time.perf_counter() - started
        steps_done, samples_done = (done, samples_done) if at.stopped else (limit, samples_through(epochs - 1))
        if at.eval_losses:
            self._say(final_line(at.eval_losses[-1]))
        self._say(summary_line(at.epoch_losses[-1], at.eval_losses[-1] if at.eval_losses else None, steps_done,
                               samples_done, wall, len(group.actors)))
        if at.restarts:
            self._say(restarts_line(at.restarts))
        if config.split == "adaptive" and self._last_split:
            total = max(1, sum(self._replica_samples.values()))
            last = dict(zip(group.ranks, self._last_split))
            self._say("split of the samples: " + ", ".join(
                f"replica-{rank} {n / total:.1%} ({last.get(rank, 0)}" + (" in the last step)" if i == 0 else ")")
                for i, (rank, n) in enumerate(sorted(self._replica_samples.items()))))
        digests = group.get([r.digest.remote() for r in group.actors])
        memory = group.get([r.memory.remote() for r in group.actors])
        if len(set(digests)) != 1:
            self._say(f"WARNING: replicas hold different parameters at the end (digests {digests})")
        state = group.get([group.actors[0].state.remote()])[0]
        return dict(epoch_losses=at.epoch_losses, eval_losses=at.eval_losses, eval_accuracies=at.eval_accuracies,
                    steps=steps_done,
                    samples=samples_done, wall_time_s=wall, replica_digests=digests, epoch_times_s=epoch_times,
                    time_to_first_step_s=self._first_step_s, replica_memory=memory, state=state,
                    restarts=at.restarts, skipped_steps=at.skipped,
                    replica_samples={f"replica-{rank}": n for rank, n in sorted(self._replica_samples.items())})

    def _steps(self, group: ReplicaGroup, at: Position, batches: list, steps: int, progress: Progress) -> None:
        """Run the epoch's steps from at.index on; every replica has applied them all on return."""
        config, replicas, wire = self.config, group.actors, group.wire
        first_step = at.epoch * steps
        # per call: (loss refs, gradient refs, first step, part sizes per step), oldest first
        pending = self._pending = deque()
        carry, carried = None, []  # the last planned all-reduce, and the gradient refs it routes to
        progress.start(at.epoch, len(batches), done=at.index)
        done = at.index
        self._timing = (time.perf_counter(), at.index)
        self._last_collect, self._samples_since = self._timing[0], 0
        while done < len(batches):
            size = steps_per_call(wire, self._step_time)
            for every in (config.checkpoint_every, config.eval_every):  # calls end where a checkpoint or eval is due
                if every:
                    size = min(size, every - (first_step + done) % every)
            chunk = batches[done:done + size]
            # split each batch: contiguous parts, part r to replica r (near-equal, or sized so all
            # replicas finish together with --split adaptive), and plan the all-reduce of each
            # step: weights n_r / n and a route to every replica's gradient
            if config.split == "adaptive":
                self._shares = self._speeds.shares(len(chunk[0]), self._shares)
            plans, sizes, carry = plan_steps(chunk, len(replicas), carry, wire, first_step + done, self._shares)
            # replicas follow their plans: apply the previous all-reduce, compute their gradient (the
            # dashboard's task list names each call)
            name = f"epoch {at.epoch} steps {first_step + done}-{first_step + done + len(chunk) - 1}"
            calls = [r.run.options(name=name).remote(plan, *carried) for r, plan in zip(replicas, plans)]
            # all-reduce through the driver: the next call gets the last step's gradients (by
            # reference on the object-store wire; by (rank, step) from shared memory otherwise)
            carried = [calls[r][0] for r, n in enumerate(sizes[-1]) if n] if wire == "object_store" else []
            # gather losses a few calls behind, so the driver never stalls the replicas
            pending.append(([c[1] for c in calls], [c[0] for c in calls], first_step + done, sizes))
            if self._first_step_s is None or self._recovering is not None:  # waited for
                self._collect(group, pending, at, progress)
                self._first_step_done()
            while len(pending) > CALLS_IN_FLIGHT:
                self._collect(group, pending, at, progress)
            done += len(chunk)
            due = [every and (first_step + done) % every == 0 and done < len(batches)
                   for every in (config.checkpoint_every, config.eval_every)]
            if any(due):
                # every replica applies the call's last all-reduce; then a checkpoint of the first
                # one's state, and/or an evaluation (which may stop the run early)
                group.get([r.apply.remote(carry, *carried) for r in replicas])
                carry, carried = None, []
                while pending:
                    self._collect(group, pending, at, progress)
                if due[0]:
                    self._checkpoint(group, at)
                if due[1]:
                    self._last_eval = self._evaluate(group)
                    loss, accuracy = self._last_eval
                    self._say(f"step {first_step + done}: eval loss={loss:.6f}"
                              + (f", accuracy={accuracy:.1%}" if accuracy is not None else ""))
                    self._event({"event": "eval", "epoch": at.epoch, "step": first_step + done, "eval_loss": loss,
                                 "eval_accuracy": accuracy})
                    self._judge(at, loss, accuracy, first_step + done)
                    if at.stopped:
                        progress.close()
                        return
        # step: every replica applies the epoch's last all-reduce
        applied = [r.apply.remote(carry, *carried) for r in replicas] if carry is not None else []
        pending.append((applied, [], first_step + done, []))  # drained with the calls if a replica is lost
        while len(pending) > 1:
            self._collect(group, pending, at, progress)
        group.get(applied)
        pending.clear()
        at.index = len(batches)
        progress.close()

    def _collect(self, group: ReplicaGroup, pending: deque, at: Position, progress: Progress) -> None:
        """Turn the oldest call's per-replica loss lists into per-step sample-weighted losses."""
        refs, _, first_step, sizes_per_step = pending[0]
        try:
            per_replica = group.get(refs)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e} (epoch {at.epoch}); {self._kept()}") from e
        pending.popleft()  # only now: a call that failed stays listed, for _drain
        before, sum_before, samples_before = len(at.losses), at.loss_sum, at.loss_samples
        now = time.perf_counter()
        for offset, sizes in enumerate(sizes_per_step):
            active = [r for r, n in enumerate(sizes) if n]
            parts = [per_replica[r][0][offset] for r in active]
            for r in active:  # its own time on its part (compute, and the rest): how fast each replica is
                self._speeds.observe(r, sizes[r], *per_replica[r][1][offset])
                self._replica_samples[group.ranks[r]] += sizes[r]
            at.add(weighted_mean(parts, [sizes[r] for r in active]), sum(sizes))
            if not math.isfinite(at.losses[-1]):  # on_nonfinite 'skip': every replica skipped its update
                culprits = ", ".join(f"replica-{group.ranks[r]}" for r, p in zip(active, parts) if not math.isfinite(p))
                at.skipped.append(first_step + offset)
                self._say(f"step {first_step + offset}: non-finite loss or gradient on {culprits}; update skipped")
                self._event({"event": "step_skipped", "step": first_step + offset, "replicas": culprits})
        at.index = before + len(sizes_per_step)
        # the dashboard's figures, and a per-step record every log_every steps
        samples = sum(at.counts[before:])
        started, index = self._timing
        self._samples_since += samples
        rate = self._samples_since / max(now - started, 1e-9)
        self._metrics.stepped(len(sizes_per_step), samples, (now - self._last_collect) / len(sizes_per_step))
        self._last_collect = now
        self._metrics.set(step=first_step + len(sizes_per_step), epoch=at.epoch, samples_per_second=rate,
                          train_loss=at.running_loss())
        every = self.config.log_every
        for offset in range(len(sizes_per_step)):
            done_steps = first_step + offset + 1
            if every and (done_steps % every == 0 or done_steps == 1):  # the first step too: where the curve starts
                self._event({"event": "step", "epoch": at.epoch, "step": done_steps,
                             "loss": at.losses[before + offset], "samples_per_s": rate,
                             "split": sizes_per_step[offset]})
        self._last_split = sizes_per_step[-1]
        if self.config.split == "adaptive":  # an even split says nothing per replica: no gauges to set
            self._metrics.split({f"replica-{rank}": n / max(1, sum(self._last_split))
                                 for rank, n in zip(group.ranks, self._last_split)})
        progress.advance(len(sizes_per_step), at.loss_samples - samples_before, at.loss_sum - sum_before)
        self._step_time = (now - started) / max(1, len(at.losses) - index)

    def _evaluate(self, group: ReplicaGroup) -> tuple[Optional[float], Optional[float]]:
        """Eval loss (and a classifier's accuracy) over the eval set, each replica scoring a part."""
        if not self._eval_size:
            return None, None
        eval_parts = split_batch(torch.arange(self._eval_size), len(group.actors))
        scores = group.get([r.evaluate.remote(p.numpy(), self.config.batch_size)
                            for r, p in zip(group.actors, eval_parts)])
        sizes = [len(p) for p in eval_parts]
        loss = weighted_mean([value or 0.0 for value, _ in scores], sizes)
        classifier = all(right is not None for (_, right), n in zip(scores, sizes) if n)
        return loss, weighted_mean([right or 0.0 for _, right in scores], sizes) if classifier else None

    def _judge(self, at: Position, loss: float, accuracy: Optional[float], step: int) -> None:
        """Early stopping: count evaluations without improvement of early_stop_metric."""
        config = self.config
        if not config.early_stop_patience:
            return
        value = loss if config.early_stop_metric == "eval_loss" else -(accuracy if accuracy is not None else 0.0)
        if at.best is None or value < at.best:
            at.best, at.since_best = value, 0
            return
        at.since_best += 1
        if at.since_best >= config.early_stop_patience:
            at.stopped = True
            best = at.best if config.early_stop_metric == "eval_loss" else -at.best
            self._say(f"early stop at step {step}: {config.early_stop_metric} has not improved on {best:.6f} for "
                      f"{at.since_best} evaluations")
            self._event({"event": "early_stop", "step": step, "metric": config.early_stop_metric, "best": best})

    def _first_step_done(self) -> None:
        now = time.perf_counter()
        if self._first_step_s is None:
            self._first_step_s = now - self._fit_started
        if self._recovering is not None:
            record, detected = self._recovering
            record["recovery_s"] = round(now - detected, 3)
            self._say(f"recovered: first step after the loss done {record['recovery_s']:.1f} s after it was detected")
            self._event(dict(record))
            self._recovering = None

    def _recover(self, group: ReplicaGroup, lost: ReplicaLost, at: Position, batches: list, steps: int) -> None:
        """Replace the lost replicas (or go on without them), load every replica with the most
        advanced survivor's state, and set `at` to that step: its gradient is computed again."""
        detected, detected_at = time.perf_counter(), time.time()
        config = self.config
        self._drain()
        cause = lost.__cause__
        kind = type(cause).__name__ if cause is not None and not isinstance(cause, ReplicaError) else "hang"
        self._say(f"{lost}; recovering")
        for attempt in range(3):
            try:
                gone = group.dead()
                names = [f"replica-{group.ranks[p]}" for p in gone]
                survivors = [group.actors[p] for p in range(len(group.actors)) if p not in gone]
                if not survivors:
                    raise ReplicaError(f"every replica was lost ({lost}); {self._kept()}") from lost
                positions = group.get([a.position.remote() for a in survivors])
                step = max(positions)
                if at.restarts and at.restarts[-1]["step"] == step and at.restarts[-1]["replicas"] == names:
                    raise ReplicaError(f"{lost} again at step {step}, as before its replacement: that step itself "
                                       f"kills it; {self._kept()}") from lost
                source = survivors[positions.index(step)]
                snapshot = source.snapshot.remote(at.epoch * steps + len(at.losses))
                behind = [a for a, p in zip(survivors, positions) if p < step]
                replaced, dropped, spares_used = group.replace(gone)
                fresh = [a for a in group.actors if a not in survivors]
                group.get([a.restore.remote(snapshot) for a in behind + fresh])
                group.rewire()
                break
            except ReplicaLost as again:  # another loss while recovering: start over
                lost = again
        else:
            raise ReplicaError(f"replicas kept failing while recovering ({lost}); {self._kept()}") from lost
        record = {"event": "replica_lost", "detected_at": detected_at, "step": step, "replicas": names, "cause": kind, "replaced":
                  [f"replica-{r}" for r in replaced], "dropped": [f"replica-{r}" for r in dropped],
                  "spares_used": spares_used,
                  "workers": len(group.actors)}
        at.restarts.append(record)
        self._speeds, self._shares = SpeedEstimate(len(group.actors)), None  # positions changed: measure afresh
        self._metrics.restarted(len(names))
        self._metrics.set(workers=len(group.actors))
        # the losses of steps the driver had not gathered yet come with the snapshot
        index = step - at.epoch * steps
        logged = ray.get(snapshot)["losses"]
        at.trim(index)
        for k in range(len(at.losses), index):
            at.add(logged[at.epoch * steps + k], len(batches[k]))
        at.index = index
        if dropped:
            self._say(f"no room for a replacement of {', '.join(record['dropped'])} within replace_timeout "
                      f"{config.replace_timeout:g} s: going on with {len(group.actors)} replicas (same result)")
        if len(group.actors) < config.min_workers:
            path = self._checkpoint(group, at)
            raise ReplicaError(f"{len(group.actors)} replicas left, fewer than min_workers={config.min_workers}; "
                               f"checkpoint {path}; resume with --resume {config.output_dir}" if path else
                               f"{len(group.actors)} replicas left, fewer than min_workers={config.min_workers} "
                               f"(set output_dir to keep a checkpoint)") from lost
        by_spare = f" (by {', '.join(spares_used)}, started ahead)" if spares_used else ""
        self._say(f"replaced {', '.join(record['replaced']) or 'none'}{by_spare}; every replica at step {step}: "
                  f"redoing it on {len(group.actors)} replicas")
        self._recovering = (record, detected)

    def _drain(self, timeout: Optional[float] = None) -> None:
        """Wait out the calls in flight when a replica was lost (they fail at once, or finish) and
        take their errors, which Ray would otherwise print as unhandled."""
        refs = [ref for loss_refs, grad_refs, _, _ in self._pending for ref in (*loss_refs, *grad_refs)]
        self._pending.clear()
        ray.wait(refs, num_returns=len(refs), timeout=self.config.step_timeout if timeout is None else timeout)
        for ref in refs:
            try:
                ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001  (expected: these calls met the lost replica)
                pass

    def _checkpoint(self, group: ReplicaGroup, at: Position) -> Optional[Path]:
        """Write a checkpoint of where the run stands (first replica's state) into output_dir."""
        if not self._run_dir:
            return None
        snapshot = group.get([group.actors[0].snapshot.remote(0)])[0]
        index = snapshot["steps"] - at.epoch * self._steps_per_epoch
        payload = {
            "model": snapshot["model"], "optimizer": snapshot["optimizer"], "schedule": snapshot["schedule"],
            "rng": snapshot["rng"], "scaler": snapshot["scaler"], "epoch": at.epoch, "index": index,
            "losses": torch.tensor(at.losses[:index], dtype=torch.float64),
            "counts": torch.tensor(at.counts[:index], dtype=torch.int64),
            "epoch_losses": list(at.epoch_losses), "eval_losses": list(at.eval_losses),
            "eval_accuracies": list(at.eval_accuracies), "best": at.best, "since_best": at.since_best,
            "restarts": json.dumps(at.restarts), "skipped": list(at.skipped),
            "config": self.config.to_dict(),
        }
        path = checkpoint.save(self._run_dir.path, snapshot["steps"], payload, self.config.keep_checkpoints)
        self._event({"event": "checkpoint", "step": snapshot["steps"], "path": str(path)})
        self._last_checkpoint = path
        return path

    def _load_checkpoint(self) -> dict:
        saved, self._last_checkpoint, skipped = checkpoint.load_latest(self.resume_from)
        for line in skipped:
            self._say(f"skipping a checkpoint: {line}")
        theirs = saved["config"]
        for name in RUN_DEFINING:
            if theirs.get(name) != getattr(self.config, name):
                raise CheckpointError(f"{self.resume_from} was trained with {name}={theirs.get(name)!r}, this run "
                                      f"asks for {getattr(self.config, name)!r}: resume with the same {name}")
        if saved["epoch"] >= self.config.epochs and saved["index"] == 0:
            self._say(f"{self.resume_from}: the run already finished; nothing to resume")
        return saved

    def _restore(self, group: ReplicaGroup, saved: dict) -> Position:
        """Load every replica with the checkpoint's state; the run goes on from its position."""
        snapshot = ray.put({"model": saved["model"], "optimizer": saved["optimizer"], "schedule": saved["schedule"],
                            "rng": saved["rng"], "scaler": saved.get("scaler"), "steps": saved["step"]})
        group.get([a.restore.remote(snapshot) for a in group.actors])
        group.rewire()  # the shared-memory step counters start at the restored step
        self._say(f"resumed from {self._last_checkpoint}: epoch {saved['epoch']}, step {saved['step']}")
        at = Position(epoch=saved["epoch"], index=saved["index"], epoch_losses=list(saved["epoch_losses"]),
                      eval_losses=list(saved["eval_losses"]), eval_accuracies=list(saved.get("eval_accuracies", [])),
                      best=saved.get("best"), since_best=saved.get("since_best", 0),
                      restarts=json.loads(saved["restarts"]),
                      skipped=list(saved["skipped"]))
        for loss, samples in zip(saved["losses"].tolist(), saved["counts"].tolist()):
            at.add(loss, samples)
        return at

    def _kept(self) -> str:
        last = getattr(self, "_last_checkpoint", None)
        if last:
            return f"last good checkpoint {last}"
        return "no checkpoint written yet" if self._run_dir else "no checkpoint written (set output_dir)"

    def _event(self, record: dict) -> None:
        if self._run_dir:
            self._run_dir.log(record)

    @property
    def _run_dir(self) -> Optional[RunDir]:
        if not hasattr(self, "_run_dir_cache"):
            path = self.config.output_dir or self.resume_from
            self._run_dir_cache = RunDir(path, tensorboard=self.config.tensorboard) if path else None
        return self._run_dir_cache

    def _say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)
