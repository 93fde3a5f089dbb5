"""The driver: Trainer.fit builds the starting point, opens a Ray session and the replica group,
and runs the epoch loop (loop.py), which all-reduces through the driver and recovers from lost
replicas without leaving the loop.

    from raytorch import Trainer, TrainConfig
    result = Trainer(TrainConfig(workers=2), model_fn=..., dataset_fn=..., loss_fn=...).fit()
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import time
import uuid
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..config import TrainConfig, callback_specs, imported_fns
from ..core.position import Position
from ..core.result import TrainResult
from ..core.runplan import RunPlan
from ..core.snapshot import Snapshot
from ..data.datasets import Stream, addressable
from ..errors import CheckpointError, ConfigError, ReplicaError
from ..group.cluster import ray_session
from ..group.group import replica_group
from ..output.callbacks import Callback, named_callback
from ..output.lines import compile_line, is_scalar_linear
from ..output.progress import ProgressLog, quiet_marked_lines
from ..output.sink import RunOutput
from ..persist.checkpoint import RunCheckpoints
from ..persist.runfiles import claim
from ..persist.storage import RunStorage
from ..replica import fsdp
from ..replica.batches import check_dataset
from ..replica.device import resolve_device
from ..replica.flatgrad import running_statistics
from .loop import EpochLoop
from .policy import RecoveryPolicy
from .preflight import preflight
from .recovery import until_settled
from .signals import StopRequest

__all__ = ["Trainer", "TrainResult"]


class Trainer:
    """Data-parallel training of `model_fn()` on `dataset_fn()` over config.workers Ray replicas.

    loss_fn(output, target) on datasets of (input, target) pairs, or step_fn(model, batch) -> loss
    for any other batch (dicts, nested: what the items collate to, moved to the replica's device).
    optimizer_fn(model) -> torch.optim.Optimizer (parameter groups welcome) and
    schedule_fn(optimizer, total_steps) -> scheduler (stepped once per optimizer step) replace
    config's optimizer, lr, weight_decay and lr_schedule, warmup_steps; collate_fn(items) -> batch
    replaces default_collate (sequences of different lengths padded, ...). Each runs in every replica.
    resume_from: a run directory whose newest valid checkpoint the run continues from.
    callbacks: raytorch.Callback objects that get the run's records (callbacks.py), before those
    config.callbacks names.
    """

    def __init__(self, config: TrainConfig, *, model_fn: Callable[[], nn.Module], dataset_fn: Callable,
                 loss_fn: Optional[Callable] = None, step_fn: Optional[Callable] = None,
                 optimizer_fn: Optional[Callable] = None, schedule_fn: Optional[Callable] = None,
                 collate_fn: Optional[Callable] = None, eval_dataset_fn: Optional[Callable] = None,
                 quiet: bool = False, resume_from: Optional[str] = None,
                 callbacks: Sequence[Callback] = (), shard_blocks_fn: Optional[Callable] = None):
        named = imported_fns(config)  # pkg.module:fn in config.step, optimizer, lr_schedule
        step_fn, optimizer_fn = step_fn or named["step_fn"], optimizer_fn or named["optimizer_fn"]
        schedule_fn, collate_fn = schedule_fn or named["schedule_fn"], collate_fn or named["collate_fn"]
        if (loss_fn is None) == (step_fn is None):
            raise ConfigError("loss_fn", "give loss_fn(output, target) for (input, target) items, or "
                                         "step_fn(model, batch) -> loss for any other: one of the two")
        self.config, self.model_fn, self.loss_fn = config, model_fn, loss_fn
        self.user_fns = {"step_fn": step_fn, "optimizer_fn": optimizer_fn, "schedule_fn": schedule_fn,
                         "collate_fn": collate_fn, "blocks_fn": shard_blocks_fn or named["shard_blocks_fn"]}
        self.dataset_fn, self.eval_dataset_fn = dataset_fn, eval_dataset_fn
        self.quiet, self.resume_from = quiet, resume_from
        # yours first, then those the config names (mlflow, wandb, pkg.module:Class): made here, so a
        # missing package or a bad path fails before Ray starts
        self.callbacks = (*callbacks, *(named_callback(spec) for spec in callback_specs(config)))

    def fit(self) -> TrainResult:
        """Train; the callbacks' on_end gets the result, or None where the run stops on an error."""
        config = self.config
        preflight(config)  # what the config asks of this machine (tensorboard, a URL's backend): before Ray
        if (config.eval_every or config.early_stop_patience) and self.eval_dataset_fn is None:
            raise ConfigError("eval_every" if config.eval_every else "early_stop_patience",
                              "needs an eval set: give eval_dataset_fn (or a dataset with one)")
        # a local run directory, or a URL whose files are staged in a local directory and uploaded
        storage = RunStorage(config.output_dir or self.resume_from,
                             "output_dir" if config.output_dir else "resume_from")
        output = RunOutput(config, self.quiet, storage.local, self.callbacks)
        checkpoints = RunCheckpoints(storage.url, config, output.say, storage.mirror)
        try:
            result = self._fit(output, storage, checkpoints)
        except OSError as e:  # the driver's own writes into the run directory: a full disk, no permission
            output.ended(None)
            if not writing_run_dir(e, storage.local):
                raise
            raise CheckpointError(f"could not write to the run directory {storage.url} ({e.strerror or e}: "
                                  f"{e.filename}); {checkpoints.kept()}") from e
        except BaseException:
            output.ended(None)
            raise
        output.ended(result)
        return result

    def _fit(self, output: RunOutput, storage: RunStorage, checkpoints: RunCheckpoints) -> TrainResult:
        fit_started, config = time.perf_counter(), self.config
        storage.open(output.say)  # a URL: checked for writing, what it holds staged
        # a fresh run refuses another run's directory (or overwrites it); interrupted writes' leftovers go
        claim(storage, self.resume_from is not None and config.output_dir in (None, self.resume_from),
              config.overwrite, output.say)
        resumed = checkpoints.resume(self.resume_from) if self.resume_from else None
        if checkpoints.finished:  # nothing to train: its result at once, without Ray
            return self._finished_run(*resumed, fit_started)
        train_set, eval_set = self._datasets(output)
        plan = RunPlan.of(config, len(train_set), stream=isinstance(train_set, Stream))
        model, init_state = self._starting_point(output)
        run_name = f"raytorch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        metadata = {"job_name": run_name, "raytorch_config": json.dumps(config.to_dict())}
        # the signal handlers after Ray's start: ray.init installs its own for SIGTERM
        with ray_session(config.address, metadata, quiet=self.quiet) as session, StopRequest() as stop:
            try:
                output.started(run_name, session.gcs_address, session.dashboard_url)
                config = resolve_device(config, session.resources)
                if config.device != self.config.device:
                    output.say(f"device auto: {config.device}")
                if config.compile:
                    output.say(compile_line())
                with replica_group(config, run_name, model_fn=self.model_fn, loss_fn=self.loss_fn,
                                   init_state=init_state, train_set=train_set, eval_set=eval_set,
                                   total_steps=plan.total_steps,
                                   **{name: fn for name, fn in self.user_fns.items() if fn is not None}) as group:
                    # a replica lost while starting (or restoring) is replaced and all asked again, as
                    # the policy allows: the state they load is the driver's, so nothing is lost
                    policy = RecoveryPolicy(config.min_workers, sharded=config.shard == "full")
                    lost = until_settled(group.settle, group, policy, "starting")
                    output.replicas_started(config, group.described(), group.wire_reason)
                    # progress in replica-0's actor log, for the dashboard (not in a Tune trial: Tune reports)
                    if session.is_driver:
                        output.callbacks.add(ProgressLog(group.log_progress, plan.total_steps))
                        quiet_marked_lines()
                    at = Position()
                    if resumed is not None:
                        snapshot, at = resumed
                        lost += until_settled(partial(group.restore, snapshot), group, policy, "restoring")
                        output.resumed(checkpoints.last, at.epoch, snapshot.steps)
                    loop = EpochLoop(config, group, plan, at, output, checkpoints,
                                     len(eval_set) if eval_set is not None else 0, is_scalar_linear(init_state),
                                     fit_started, stop, lost)
                    try:
                        result = loop.run(model)
                    except ReplicaError as e:
                        loop.abandon()
                        told = with_kept(e, checkpoints.kept() if checkpoints.last else "")
                        if told is e:
                            raise
                        raise told from e
            finally:
                output.close()
                storage.mirror()  # what the run wrote, also where it stops on an error or a signal
        output.model_trained(model)
        storage.mirror(strict=True)
        return dataclasses.replace(result, resumed_from=resumed[0].steps if resumed else None)

    def _finished_run(self, snapshot: Snapshot, at: Position, fit_started: float) -> TrainResult:
        """The result of a run that had finished when it was resumed: its model and its losses."""
        torch.manual_seed(self.config.seed)
        model = self.model_fn()
        model.load_state_dict(snapshot.model)
        return TrainResult(epoch_losses=at.epoch_losses, eval_losses=at.eval_losses, eval_accuracies=at.eval_accuracies,
                           model=model, steps=snapshot.steps, samples=0, wall_time_s=time.perf_counter() - fit_started,
                           restarts=at.restarts, skipped_steps=at.skipped, resumed_from=snapshot.steps)

    def _datasets(self, output: RunOutput) -> tuple:
        """The train and eval sets, addressable by index (a stream (IterableDataset) by position, a
        ray.data.Dataset by block and row), their items checked against the step."""
        train_set = addressable(self.dataset_fn(), output.say)
        eval_set = addressable(self.eval_dataset_fn(), lambda _: None) if self.eval_dataset_fn else None
        check_dataset(train_set, "dataset", self.user_fns["step_fn"], self.user_fns["collate_fn"])
        if eval_set is not None:
            check_dataset(eval_set, "eval dataset", self.user_fns["step_fn"], self.user_fns["collate_fn"])
        return train_set, eval_set

    def _starting_point(self, output: RunOutput) -> tuple[nn.Module, dict]:
        """The contract's starting point: model_fn() right after torch.manual_seed(seed) (or zeros,
        with init 'zeros'), and its state on CPU, which every replica loads."""
        torch.manual_seed(self.config.seed)
        model = self.model_fn()
        if self.config.init == "zeros":
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
        if self.config.shard == "full" and (refused := fsdp.refusal(model, self.user_fns["blocks_fn"])):
            raise ConfigError(*refused)
        if running_statistics(model):
            output.say(batchnorm_rule(self.config))
        return model, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def with_kept(error: ReplicaError, kept: str) -> ReplicaError:
    """`error`, its message followed by where the run can resume from (its fields kept), unless
    it says so already or there is no checkpoint to name (`kept` empty)."""
    if not kept or "--resume" in str(error):  # kept names --resume: a message with it says where already
        return error
    told = copy.copy(error)
    told.args = (f"{error}; {kept}", *error.args[1:])
    return told


def writing_run_dir(error: OSError, run_dir) -> bool:
    """Whether `error` is a failed write into the run directory `run_dir` (None: there is none)."""
    full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # writes need no filename to fail
    return run_dir is not None and (full or str(error.filename or "").startswith(str(run_dir)))


def batchnorm_rule(config: TrainConfig) -> str:
    """What a model with BatchNorm trains, said once at start."""
    if config.sync_batchnorm:
        return ("the model has BatchNorm, synchronized: batch statistics over each whole global batch, as one "
                "process computes them (--sync-batchnorm)")
    return ("the model has BatchNorm: each replica normalizes by its own part's batch statistics, so the result "
            "depends on the number of replicas and the split (running statistics are averaged over replicas after "
            "every step: replicas agree); for a result that does not, use --sync-batchnorm "
            "(TrainConfig(sync_batchnorm=True)), or GroupNorm, LayerNorm")
