"""RunOutput: the one sink for everything a run tells: console lines, the progress bar, the run
directory (metrics.jsonl, TensorBoard, loss.png, model.pt) and Ray metrics, behind typed methods.

Every event that goes to metrics.jsonl is one dict record, handed to each of `listeners`: the run
directory is the first; a user's callback (MLflow, W&B, ...) is one more callable taking a record.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .config import TrainConfig
from .position import Position
from .report import Progress, RunDir, epoch_line, final_line, replica_name, restarts_line, summary_line
from .telemetry import RunMetrics


class StepsDone(NamedTuple):
    """Steps whose losses the driver has just gathered (one call's)."""

    epoch: int
    first_step: int
    """Global step of the first of them."""
    losses: list[float]
    """Each step's global loss."""
    sizes: list[list[int]]
    """Each step's part sizes, by wire position."""
    ranks: list[int]
    """The rank at each wire position."""
    samples_per_s: float
    """Over the epoch so far."""
    seconds_per_step: float
    """Since the previous gathering."""
    running_loss: Optional[float]
    split_shown: bool
    """Per-replica share gauges (an adaptive split); an even one says nothing per replica."""


class RunOutput:
    """What one run prints, writes and exports."""

    def __init__(self, config: TrainConfig, quiet: bool = False, run_dir: Optional[str] = None):
        self.config, self.quiet, self.run_dir_path = config, quiet, run_dir
        self.run_dir: Optional[RunDir] = None  # made once the replicas are up (replicas_started)
        self.listeners: list[Callable[[dict], None]] = []
        self.progress = Progress(enabled=not quiet)
        self.metrics: Optional[RunMetrics] = None  # once Ray is up (started)
        self.loss_seen = (0, 0.0)  # samples and loss sum the progress bar has been given this epoch

    # -- plumbing ----------------------------------------------------------------------------------

    def say(self, line: str) -> None:
        """One console line (nothing with quiet)."""
        if not self.quiet:
            print(line, flush=True)

    def record(self, record: dict) -> None:
        """One event record to every listener (metrics.jsonl first)."""
        for listener in self.listeners:
            listener(record)

    def close(self) -> None:
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.run_dir:
            self.run_dir.close()

    # -- start ---------------------------------------------------------------------------------------

    def started(self, run_name: str, gcs_address: str, dashboard_url: Optional[str]) -> None:
        dashboard = f", dashboard http://{dashboard_url}" if dashboard_url else ""
        self.say(f"Run {run_name}: Ray at {gcs_address}{dashboard}")
        self.metrics = RunMetrics(run_name)

    def replicas_started(self, config: TrainConfig, replicas: list[dict], wire_reason: str = "") -> None:
        """The run's resolved config is final: write it; one line per replica, and why gradients
        travel as they do."""
        self.config = config
        if self.run_dir_path and self.run_dir is None:
            self.run_dir = RunDir(self.run_dir_path, tensorboard=config.tensorboard)
            self.run_dir.write_config(config)
            self.listeners.insert(0, self.run_dir.log)
        for info in replicas:
            self.say(f"{replica_name(info['rank'])}: {info['device']}, node {info['node_id'][:12]}, pid {info['pid']}, "
                     f"gradients via {info['wire']}")
        if replicas and wire_reason:
            self.say(f"gradients via {replicas[0]['wire']}: {wire_reason}")
        if config.mixed_devices:
            self.say("mixed devices: each device rounds its own way (other kernels, cuDNN's TF32), so this run "
                     "matches one process to float tolerance, not bit for bit"
                     + ("" if config.split == "adaptive" else "; --split adaptive would give each replica the share "
                        "it can carry"))
        self.metrics.set(workers=len(replicas))

    # -- steps ---------------------------------------------------------------------------------------

    def epoch_started(self, at: Position, steps: int) -> None:
        """The progress bar of an epoch of `steps` steps, from where `at` stands (mid-epoch after a
        loss or a resume)."""
        self.progress.start(at.epoch, steps, done=at.index)
        self.loss_seen = (at.loss_samples, at.loss_sum)

    def steps_done(self, done: StepsDone, at: Position) -> None:
        """The dashboard's figures, a per-step record every log_every steps, the progress bar."""
        samples = sum(sum(sizes) for sizes in done.sizes)
        count = len(done.losses)
        self.metrics.stepped(count, samples, done.seconds_per_step)
        self.metrics.set(step=done.first_step + count, epoch=done.epoch, samples_per_second=done.samples_per_s,
                         train_loss=done.running_loss)
        every = self.config.log_every
        for offset, loss in enumerate(done.losses):
            step = done.first_step + offset + 1
            if every and (step % every == 0 or step == 1):  # the first step too: where the curve starts
                self.record({"event": "step", "epoch": done.epoch, "step": step, "loss": loss,
                             "samples_per_s": done.samples_per_s, "split": done.sizes[offset]})
        if done.split_shown:
            last = done.sizes[-1]
            self.metrics.split({replica_name(rank): n / max(1, sum(last)) for rank, n in zip(done.ranks, last)})
        seen_samples, seen_sum = self.loss_seen
        self.progress.advance(count, at.loss_samples - seen_samples, at.loss_sum - seen_sum)
        self.loss_seen = (at.loss_samples, at.loss_sum)

    def step_skipped(self, step: int, culprits: list[int]) -> None:
        names = ", ".join(replica_name(rank) for rank in culprits)
        self.say(f"step {step}: non-finite loss or gradient on {names}; update skipped")
        self.record({"event": "step_skipped", "step": step, "replicas": names})

    def epoch_steps_done(self) -> None:
        self.progress.close()

    # -- evaluation, epochs, checkpoints -------------------------------------------------------------

    def evaluated(self, epoch: int, step: int, loss: float, accuracy: Optional[float]) -> None:
        """An evaluation inside an epoch (eval_every)."""
        self.say(f"step {step}: eval loss={loss:.6f}" + (f", accuracy={accuracy:.1%}" if accuracy is not None else ""))
        self.record({"event": "eval", "epoch": epoch, "step": step, "eval_loss": loss, "eval_accuracy": accuracy})

    def early_stop(self, step: int, best: float, evaluations: int) -> None:
        metric = self.config.early_stop_metric
        self.say(f"early stop at step {step}: {metric} has not improved on {best:.6f} for {evaluations} evaluations")
        self.record({"event": "early_stop", "step": step, "metric": metric, "best": best})

    def epoch_ended(self, epoch: int, at: Position, eval_loss: Optional[float], accuracy: Optional[float],
                    state: Optional[dict], steps: int, samples: int, epoch_time_s: float) -> None:
        """The seed note's line, an epoch record, the dashboard's gauges."""
        loss = at.epoch_losses[-1]
        self.metrics.set(train_loss=None if math.isnan(loss) else loss, eval_loss=eval_loss, eval_accuracy=accuracy)
        self.say(epoch_line(epoch, loss, state, eval_loss, accuracy))
        self.record({"event": "epoch", "epoch": epoch, "loss": loss, "eval_loss": eval_loss, "eval_accuracy": accuracy,
                     "steps": steps, "samples": samples, "epoch_time_s": epoch_time_s,
                     "samples_per_s": sum(at.counts) / epoch_time_s})

    def checkpointed(self, step: int, path) -> None:
        self.record({"event": "checkpoint", "step": step, "path": str(path)})

    def resumed(self, path, epoch: int, step: int) -> None:
        self.say(f"resumed from {path}: epoch {epoch}, step {step}")

    # -- failures ------------------------------------------------------------------------------------

    def replica_lost(self, lost: Exception) -> None:
        self.progress.close()
        self.say(f"{lost}; recovering")

    def replaced(self, record: dict, workers: int) -> None:
        """Recovery has put every replica at the step to redo."""
        self.metrics.restarted(len(record["replicas"]))
        self.metrics.set(workers=workers)
        if record["dropped"]:
            self.say(f"no room for a replacement of {', '.join(record['dropped'])} within replace_timeout "
                     f"{self.config.replace_timeout:g} s: going on with {workers} replicas (same result)")

    def joined(self, name: str, workers: int, step: int) -> None:
        """An elastic run took in a replica that found room."""
        self.metrics.set(workers=workers)
        self.say(f"{name} joined (room appeared): {workers} replicas from step {step}, the same math")
        self.record({"event": "replica_joined", "replica": name, "workers": workers, "step": step,
                     "at": round(time.time(), 3)})

    def moved(self, names: list[str], step: int) -> None:
        """Replicas moved off draining nodes before those went."""
        self.say(f"moved {', '.join(names)} off a draining node before step {step}: nothing redone")
        self.record({"event": "replicas_moved", "replicas": names, "step": step, "at": round(time.time(), 3)})

    def lost_before_training(self, record: dict) -> None:
        """A replica lost while the group started or restored a resume: replaced, nothing redone."""
        self.metrics.restarted(len(record["replicas"]))
        dropped = (f"; no room for {', '.join(record['dropped'])} within replace_timeout: going on with "
                   f"{record['workers']} replicas (same result)" if record["dropped"] else "")
        self.say(f"{', '.join(record['replicas'])} lost while {record['phase']} ({record['cause']}): replaced "
                 f"{', '.join(record['replaced']) or 'none'}{dropped}")
        self.record(dict(record))

    def redoing(self, record: dict, workers: int) -> None:
        spares = record["spares_used"]
        by_spare = f" (by {', '.join(spares)}, started ahead)" if spares else ""
        self.say(f"replaced {', '.join(record['replaced']) or 'none'}{by_spare}; every replica at step "
                 f"{record['step']}: redoing it on {workers} replicas")

    def recovered(self, record: dict) -> None:
        """The first step after a loss is done: the record with its recovery time."""
        self.say(f"recovered: first step after the loss done {record['recovery_s']:.1f} s after it was detected")
        self.record(dict(record))

    # -- the end -------------------------------------------------------------------------------------

    def finished(self, at: Position, steps: int, samples: int, wall_s: float, workers: int,
                 replica_samples: dict[int, int], last_split: dict[int, int], digests: list[str]) -> None:
        """The closing lines: final loss, summary, restarts, the split (adaptive), a divergence warning."""
        if at.eval_losses:
            self.say(final_line(at.eval_losses[-1]))
        self.say(summary_line(at.epoch_losses[-1], at.eval_losses[-1] if at.eval_losses else None, steps, samples,
                              wall_s, workers))
        if at.restarts:
            self.say(restarts_line(at.restarts))
        if self.config.split == "adaptive" and last_split:
            total = max(1, sum(replica_samples.values()))
            shares = [f"{replica_name(rank)} {n / total:.1%} ({last_split.get(rank, 0)}"
                      + (" in the last step)" if i == 0 else ")")
                      for i, (rank, n) in enumerate(sorted(replica_samples.items()))]
            self.say("split of the samples: " + ", ".join(shares))
        if len(set(digests)) != 1:
            self.say(f"WARNING: replicas hold different parameters at the end (digests {digests})")

    def model_trained(self, model: nn.Module) -> None:
        """model.pt and loss.png in the run directory."""
        if not self.run_dir:
            return
        torch.save(model.state_dict(), self.run_dir.path / "model.pt")
        plot = self.run_dir.plot()
        self.say(f"Loss curve: {plot}" if plot
                 else "No loss curve drawn: it needs matplotlib (pip install 'raytorch[plot]')")
