"""EpochLoop: the run from where it stands to its end, epoch by epoch, recovering from lost
replicas without leaving the loop."""

from __future__ import annotations

import math
import signal
import time
from typing import Optional, Sequence

import torch
from torch import nn

from ..config.schema import TrainConfig
from ..core.naming import replica_name
from ..core.position import Position
from ..core.reduce import weighted_mean
from ..core.result import TrainResult
from ..core.runplan import RunPlan
from ..core.sharding import split_batch
from ..errors import Interrupted, ReplicaError, ReplicaLost
from ..group.group import ReplicaGroup
from ..output.lines import memory_line
from ..output.sink import RunOutput
from ..persist.checkpoint import RunCheckpoints
from ..replica.profiler import write_profiles
from .pipeline import StepPipeline
from .policy import RecoveryPolicy
from .recovery import Recovery
from .signals import StopRequest


class EpochLoop:
    """Runs `plan` on `group` from `at`: steps, evaluation, early stopping, logs, checkpoints."""

    def __init__(self, config: TrainConfig, group: ReplicaGroup, plan: RunPlan, at: Position, output: RunOutput,
                 checkpoints: RunCheckpoints, eval_size: int, scalar_linear: bool, fit_started: float,
                 stop: Optional[StopRequest] = None, lost_before: Sequence[dict] = ()):
        self.config, self.group, self.plan, self.at = config, group, plan, at
        self.output, self.checkpoints, self.eval_size = output, checkpoints, eval_size
        self.scalar_linear = scalar_linear  # the seed's model: each epoch's line shows w and b
        self.stop = stop or StopRequest()  # a signal asks the run to stop between calls
        # the pipeline pauses between calls for a signal, or for a replica that found room to join (elastic)
        self.pipeline = StepPipeline(group, config, plan, output, checkpoints.kept,
                                     lambda: self.stop.requested or group.joining() or group.moving())
        policy = RecoveryPolicy(config.min_workers, on_error=config.on_error, sharded=config.shard == "full")
        self.recovery = Recovery(config, group, self.pipeline, output, plan, policy, self.checkpoint, checkpoints.kept)
        self.last_eval: tuple[Optional[float], Optional[float]] = (None, None)  # the last mid-epoch evaluation
        self.epoch_times: list[float] = []
        self.epoch_started: Optional[float] = None
        # samples_before: a resumed run's samples before it, not this run's to time
        self.fit_started, self.first_step_s, self.samples_before = fit_started, 0.0, self.done()[1]
        self.pipeline.after_next_step(lambda now: setattr(self, "first_step_s", now - self.fit_started))
        for record in lost_before:  # replicas lost while starting or restoring: replaced before any step
            at.restarts.append(record)
            output.lost_before_training(record)

    def run(self, model: nn.Module) -> TrainResult:
        """The epoch loop; returns the result with `model` holding the trained weights."""
        started = time.perf_counter()
        self.stop.listening = True
        try:
            self.epochs()
        finally:
            self.stop.listening = False
        wall_s = time.perf_counter() - started
        while True:
            try:
                return self.finish(model, wall_s)
            except ReplicaLost as lost:  # after the last step: recover (nothing to redo), then finish
                self.recovery.recover(lost, self.at, self.plan.batches_of(self.at.epoch))

    def epochs(self) -> None:
        """The epochs from where the run stands to its end (or its early stop)."""
        at = self.at
        while at.epoch < self.plan.epochs:
            if self.stop.requested:  # a signal: stop here, with a checkpoint
                self.interrupt()
            batches = self.plan.batches_of(at.epoch)
            if self.epoch_started is None:  # not again when the epoch goes on after a loss
                self.epoch_started = time.perf_counter()
            try:
                # steps of the epoch, from where the run stands (after a loss or a resume: mid-epoch)
                self.steps(batches)
                epoch_time = time.perf_counter() - self.epoch_started
                # evaluate: each replica scores a contiguous part of the eval set (an early stop
                # mid-epoch has just done so)
                eval_loss, accuracy = self.last_eval if at.stopped else self.evaluate()
                # early-stop check
                if not at.stopped and eval_loss is not None:
                    self.judge(eval_loss, accuracy, self.plan.first_step(at.epoch) + len(batches))
                state = self.group.state() if self.scalar_linear else None
            except ReplicaError as failed:
                # recover: replace the lost (or one that raised: on_error), all at the most advanced survivor's step
                self.recovery.after(failed, at, batches)
                continue
            # log: the seed's line, a metrics record, the dashboard's gauges
            self.log_epoch(eval_loss, accuracy, state, epoch_time)
            if at.stopped:
                break
            # checkpoint: the next epoch starts from here
            at.next_epoch()
            self.epoch_started = None
            self.checkpoint()

    def steps(self, batches: list) -> None:
        """The epoch's steps from at.index on, stopping where a checkpoint or an evaluation is due."""
        at = self.at
        self.output.epoch_started(at, len(batches))
        self.pipeline.start_epoch(at)
        while at.index < len(batches) and not at.stopped:
            step = self.plan.first_step(at.epoch) + at.index
            end = min([len(batches)] + [at.index + every - step % every
                                        for every in (self.config.checkpoint_every, self.config.eval_every) if every])
            self.pipeline.run(at, batches, end)
            if self.stop.requested:  # a signal: the calls in flight are done; stop with a checkpoint
                self.interrupt()
            if self.group.joining():  # elastic: room appeared; the new replica joins between steps
                self.grow()
            if self.group.moving():  # a node is draining: its replicas' stand-ins take their places
                self.output.moved(self.group.move(), self.plan.first_step(at.epoch) + at.index)
            if at.index < end:  # paused early for either: on with the steps
                continue
            if end < len(batches):  # mid-epoch: a checkpoint and/or an evaluation is due (the epoch's end has its own)
                self.midway(self.plan.first_step(at.epoch) + end)
        self.output.epoch_steps_done()

    def grow(self) -> None:
        """A replica that found room (elastic) joins with the others' state; the math is unchanged."""
        member = self.group.grow()
        self.pipeline.membership_changed()
        self.output.joined(replica_name(member.rank), self.group.size,
                           self.plan.first_step(self.at.epoch) + self.at.index)

    def midway(self, step: int) -> None:
        """A checkpoint and/or an evaluation (which may stop the run early) after global step `step`."""
        config = self.config
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            self.checkpoint()
        if config.eval_every and step % config.eval_every == 0:
            self.last_eval = loss, accuracy = self.evaluate()
            self.output.evaluated(self.at.epoch, step, loss, accuracy)
            self.judge(loss, accuracy, step)

    def evaluate(self) -> tuple[Optional[float], Optional[float]]:
        """Eval loss (and a classifier's accuracy) over the eval set, each replica scoring a part."""
        if not self.eval_size:
            return None, None
        parts = split_batch(torch.arange(self.eval_size), self.group.size)
        scores = self.group.evaluate([p.numpy() for p in parts], self.config.batch_size)
        sizes = [len(p) for p in parts]
        loss = weighted_mean([score.loss or 0.0 for score in scores], sizes)
        classifier = all(score.accuracy is not None for score, n in zip(scores, sizes) if n)
        return loss, weighted_mean([score.accuracy or 0.0 for score in scores], sizes) if classifier else None

    def judge(self, loss: float, accuracy: Optional[float], step: int) -> None:
        """Early stopping: count evaluations without improvement of early_stop_metric."""
        config = self.config
        if not config.early_stop_patience:
            return
        by_loss = config.early_stop_metric == "eval_loss"
        value = loss if by_loss else -(accuracy if accuracy is not None else 0.0)
        if self.at.judge(value, config.early_stop_patience):
            self.output.early_stop(step, self.at.best if by_loss else -self.at.best, self.at.since_best)

    def log_epoch(self, eval_loss: Optional[float], accuracy: Optional[float], state: Optional[dict],
                  epoch_time: float) -> None:
        at = self.at
        running = at.running_loss()
        at.epoch_losses.append(math.nan if running is None else running)
        self.epoch_times.append(epoch_time)
        if eval_loss is not None:
            at.eval_losses.append(eval_loss)
        if accuracy is not None:
            at.eval_accuracies.append(accuracy)
        steps, samples = self.done()  # all of the epoch's steps, unless stopped early
        self.output.epoch_ended(at.epoch, at, eval_loss, accuracy, state, steps, samples, epoch_time)

    def done(self) -> tuple[int, int]:
        """Steps and samples behind where the run stands, within its epoch."""
        at = self.at
        return self.plan.first_step(at.epoch) + at.index, self.plan.samples_through(at.epoch - 1) + sum(at.counts)

    def checkpoint(self):
        """A checkpoint of where the run stands (the first replica's state), where output_dir is set.
        A replica lost meanwhile is recovered from first."""
        if not self.checkpoints.enabled:
            return None
        while True:
            try:
                snapshot = self.group.snapshot()
                break
            except ReplicaLost as lost:
                self.recovery.recover(lost, self.at, self.plan.batches_of(self.at.epoch))
        path = self.checkpoints.save(snapshot, self.at, self.plan.first_step(self.at.epoch))
        self.output.checkpointed(snapshot.steps, path)
        self.checkpoints.mirror()  # a remote run directory: its other files, the checkpoint's record in them
        return path

    def interrupt(self) -> None:
        """Stop on a signal where the run stands: a checkpoint (where output_dir is set), then Interrupted."""
        step = self.plan.first_step(self.at.epoch) + self.at.index
        path = self.checkpoint()
        self.output.say(f"stopped by {signal.Signals(self.stop.signum).name} before step {step}"
                        + (f"; checkpoint {path}" if path else " (no output_dir: no checkpoint)"))
        raise Interrupted(self.stop.signum, str(path) if path else None, step)

    def finish(self, model: nn.Module, wall_s: float) -> TrainResult:
        """The closing lines, and the result, with `model` loaded with the replicas' weights."""
        at, group, pipeline = self.at, self.group, self.pipeline
        steps, samples = self.done() if at.stopped else (self.plan.total_steps,
                                                          self.plan.samples_through(self.plan.epochs - 1))
        # everything asked of the replicas first: a replica lost meanwhile is recovered and all asked again
        digests, memory, profiles = group.digests(), group.memory(), group.profiles()
        redone, state = max(live.redone for live in group.liveness()), group.state()
        self.output.finished(at, steps, samples - self.samples_before, wall_s, group.size, pipeline.replica_samples,
                             pipeline.last_split, digests, pipeline.uneven_split())
        self.output.say(memory_line(memory, group.ranks))
        profile = write_profiles(self.output.run_dir_path, self.config.profile_range, profiles, self.output.say)
        model.load_state_dict(state)
        return TrainResult(
            epoch_losses=at.epoch_losses, eval_losses=at.eval_losses, eval_accuracies=at.eval_accuracies, model=model,
            steps=steps, samples=samples, wall_time_s=wall_s, replica_digests=digests, epoch_times_s=self.epoch_times,
            time_to_first_step_s=self.first_step_s, replica_memory=memory, restarts=at.restarts,
            skipped_steps=at.skipped, steps_redone=redone, profile=profile,
            replica_samples={replica_name(rank): n for rank, n in sorted(pipeline.replica_samples.items())})

    def abandon(self) -> None:
        """The run stops on an error: the calls still in flight fail too; take their errors quietly."""
        self.pipeline.drain(timeout=5.0)
