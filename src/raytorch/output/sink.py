"""RunOutput: the one sink for everything a run tells: console lines, the progress bar, the run
directory (metrics.jsonl, TensorBoard, loss.png, model.pt, model.safetensors) and Ray metrics,
behind typed methods.

Every event is one dict record handed to the run's callbacks (callbacks.py): the built-in ones
first (the console's event lines, the run directory, Ray metrics), then the user's (MLflow, W&B,
their own).
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from safetensors.torch import save_model
from torch import nn

from ..config.schema import TrainConfig
from ..core.naming import replica_name
from ..core.position import Position
from .callbacks import Callback, Callbacks
from .console import Console, Progress, warn
from .lines import (
    dropped_lines,
    final_line,
    mixed_devices_line,
    restarts_line,
    scalar_linear_values,
    summary_line,
    uneven_line,
)
from .metrics import RunMetrics
from .rundir import RunDir


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


def save_safetensors(model: nn.Module, run_dir: Path, metadata: dict[str, str]) -> None:
    """run_dir/model.safetensors, with the mode model.pt beside it has: safetensors makes its file
    0600, every other file of a run takes what the umask gives (persist/checkpoint.py's too)."""
    path = run_dir / "model.safetensors"
    save_model(model, str(path), metadata=metadata)
    os.chmod(path, stat.S_IMODE((run_dir / "model.pt").stat().st_mode))


class RunOutput:
    """What one run prints, writes and exports."""

    def __init__(self, config: TrainConfig, quiet: bool = False, run_dir: Optional[str] = None,
                 callbacks: tuple[Callback, ...] = ()):
        self.config, self.quiet, self.run_dir_path = config, quiet, run_dir
        self.run_dir: Optional[RunDir] = None  # made once the replicas are up (replicas_started)
        self.callbacks = Callbacks(warn, (Console(self.say), *callbacks))  # a failing one is said even with quiet
        self.progress = Progress(enabled=not quiet)
        self.metrics: Optional[RunMetrics] = None  # once Ray is up (started)
        self.run_name = ""
        self.loss_seen = (0, 0.0)  # samples and loss sum the progress bar has been given this epoch
        self.pending_loss: Optional[dict] = None  # a loss whose redone step is not done yet

    # -- plumbing ----------------------------------------------------------------------------------

    def say(self, line: str) -> None:
        """One console line (nothing with quiet)."""
        if not self.quiet:
            print(line, flush=True)

    def record(self, record: dict) -> None:
        """One event record to every callback (the console's, then metrics.jsonl's first)."""
        self.callbacks.call("on_record", record)

    def _send_pending_loss(self) -> None:
        if self.pending_loss is not None:
            self.record(dict(self.pending_loss))
            self.pending_loss = None

    def close(self) -> None:
        self._send_pending_loss()  # the run stopped before the step redone after a loss was done
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.run_dir:
            self.run_dir.close()

    # -- start ---------------------------------------------------------------------------------------

    def started(self, run_name: str, gcs_address: str, dashboard_url: Optional[str]) -> None:
        dashboard = f", dashboard http://{dashboard_url}" if dashboard_url else ""
        self.say(f"Run {run_name}: Ray at {gcs_address}{dashboard}")
        self.run_name = run_name
        self.metrics = RunMetrics(run_name, shares=self.config.split == "adaptive")
        self.callbacks.add(self.metrics, first=True)

    def replicas_started(self, config: TrainConfig, replicas: list[dict], wire_reason: str = "") -> None:
        """The run's resolved config is final: write it; one line per replica, and why gradients
        travel as they do; then the callbacks' on_start."""
        self.config = config
        if self.run_dir_path and self.run_dir is None:
            self.run_dir = RunDir(self.run_dir_path, tensorboard=config.tensorboard, log_every=config.log_every)
            self.run_dir.write_config(config)
            self.callbacks.add(self.run_dir, first=True)
        for info in replicas:
            self.say(f"{replica_name(info['rank'])}: {info['device']}, node {info['node_id'][:12]}, pid {info['pid']}, "
                     f"gradients via {info['wire']}")
        if replicas and wire_reason:
            self.say(f"gradients via {replicas[0]['wire']}: {wire_reason}")
        if config.mixed_devices:
            self.say(mixed_devices_line(config.split))
        self.callbacks.call("on_start", {"run_name": self.run_name, "config": config.to_dict(),
                                         "run_dir": str(self.run_dir.path) if self.run_dir else None,
                                         "replicas": [dict(info) for info in replicas]})

    # -- steps ---------------------------------------------------------------------------------------

    def epoch_started(self, at: Position, steps: int) -> None:
        """The progress bar of an epoch of `steps` steps, from where `at` stands (mid-epoch after a
        loss or a resume)."""
        self.progress.start(at.epoch, steps, done=at.index)
        self.loss_seen = (at.loss_samples, at.loss_sum)

    def steps_done(self, done: StepsDone, at: Position) -> None:
        """A record per step to the callbacks (metrics.jsonl keeps every log_every-th), the progress bar."""
        names = [replica_name(rank) for rank in done.ranks]
        records = [{"event": "step", "epoch": done.epoch, "step": done.first_step + offset + 1, "loss": loss,
                    "samples": sum(done.sizes[offset]), "samples_per_s": done.samples_per_s,
                    "split": done.sizes[offset], "replicas": names, "running_loss": done.running_loss,
                    "seconds_per_step": done.seconds_per_step}
                   for offset, loss in enumerate(done.losses)]
        self.callbacks.call("on_steps", records)
        seen_samples, seen_sum = self.loss_seen
        self.progress.advance(len(records), at.loss_samples - seen_samples, at.loss_sum - seen_sum)
        self.loss_seen = (at.loss_samples, at.loss_sum)

    def step_skipped(self, step: int, culprits: list[int]) -> None:
        self.record({"event": "step_skipped", "step": step, "replicas": ", ".join(map(replica_name, culprits))})

    def epoch_steps_done(self) -> None:
        self.progress.close()

    # -- evaluation, epochs, checkpoints -------------------------------------------------------------

    def evaluated(self, epoch: int, step: int, loss: float, accuracy: Optional[float]) -> None:
        """An evaluation inside an epoch (eval_every)."""
        self.record({"event": "eval", "epoch": epoch, "step": step, "eval_loss": loss, "eval_accuracy": accuracy})

    def early_stop(self, step: int, best: float, evaluations: int) -> None:
        self.record({"event": "early_stop", "step": step, "metric": self.config.early_stop_metric, "best": best,
                     "evaluations": evaluations})

    def epoch_ended(self, epoch: int, at: Position, eval_loss: Optional[float], accuracy: Optional[float],
                    state: Optional[dict], steps: int, samples: int, epoch_time_s: float) -> None:
        """The epoch's record: the seed note's line, metrics.jsonl, the dashboard's gauges."""
        record = {"event": "epoch", "epoch": epoch, "loss": at.epoch_losses[-1], "eval_loss": eval_loss,
                  "eval_accuracy": accuracy, "steps": steps, "samples": samples, "epoch_time_s": epoch_time_s,
                  "samples_per_s": sum(at.counts) / epoch_time_s}
        if state is not None:  # the seed's model: its w and b
            record.update(scalar_linear_values(state))
        self.record(record)

    def checkpointed(self, step: int, path) -> None:
        self.record({"event": "checkpoint", "step": step, "path": str(path)})

    def resumed(self, path, epoch: int, step: int) -> None:
        self.say(f"resumed from {path}: epoch {epoch}, step {step}")

    # -- failures ------------------------------------------------------------------------------------

    def replica_lost(self, lost: Exception) -> None:
        self.progress.close()
        self.say(f"{lost}; recovering")

    def replaced(self, record: dict, workers: int) -> None:
        """Recovery has put every replica at the step to redo; the record goes out once it is done."""
        self.pending_loss = record
        for line in dropped_lines(record, self.config, workers):
            self.say(line)

    def joined(self, name: str, workers: int, step: int) -> None:
        """An elastic run took in a replica that found room."""
        self.record({"event": "replica_joined", "replica": name, "workers": workers, "step": step,
                     "at": round(time.time(), 3)})

    def moved(self, names: list[str], step: int) -> None:
        """Replicas moved off draining nodes before those went."""
        self.record({"event": "replicas_moved", "replicas": names, "step": step, "at": round(time.time(), 3)})

    def lost_before_training(self, record: dict) -> None:
        """A replica lost while the group started or restored a resume: replaced, nothing redone."""
        dropped = (f"; no room for {', '.join(record['dropped'])} within replace_timeout: going on with "
                   f"{record['workers']} replicas (same result)" if record["dropped"] else "")
        self.say(f"{', '.join(record['replicas'])} lost while {record['phase']} ({record['cause']}): replaced "
                 f"{', '.join(record['replaced']) or 'none'}{dropped}")
        self.record(dict(record))

    def redoing(self, record: dict, workers: int) -> None:
        spares = record["spares_used"]
        by_spare = f" (by {', '.join(spares)}, started ahead)" if spares else ""
        self.say(f"replaced {', '.join(record['replaced']) or 'none'}{by_spare}; every replica at step "
                 f"{record['step']}: redoing it on {workers} replica{'s' * (workers != 1)}")

    def recovered(self, record: dict) -> None:
        """The first step after a loss is done: the record with its recovery time."""
        self.say(f"recovered: first step after the loss done {record['recovery_s']:.1f} s after it was detected")
        self.pending_loss = None
        self.record(dict(record))

    # -- the end -------------------------------------------------------------------------------------

    def finished(self, at: Position, steps: int, samples: int, wall_s: float, workers: int,  # samples: this run's
                 replica_samples: dict[int, int], last_split: dict[int, int], digests: list[str],
                 uneven: Optional[tuple[str, str, float]] = None) -> None:
        """The closing lines: final loss, summary, restarts, the split (adaptive) and why it is far
        from even where it is, a divergence warning."""
        self._send_pending_loss()  # lost after the last step: recovered, with no step to redo
        if at.eval_losses:
            self.say(final_line(at.eval_losses[-1]))
        self.say(summary_line(at.epoch_losses[-1], at.eval_losses[-1] if at.eval_losses else None, steps, samples,
                              wall_s, workers))
        if at.restarts:
            self.say(restarts_line(at.restarts))
        if self.config.split == "adaptive" and last_split:
            total = max(1, sum(replica_samples.values()))
            shares = [f"{replica_name(rank)} {n / total:.1%} ({last_split.get(rank, 0)}"
                      + (" in the last full batch)" if i == 0 else ")")
                      for i, (rank, n) in enumerate(sorted(replica_samples.items()))]
            self.say("split of the samples: " + ", ".join(shares))
        if uneven is not None:
            self.say(uneven_line(*uneven))
        if len(set(digests)) != 1:
            self.say(f"WARNING: replicas hold different parameters at the end (digests {digests})")

    def model_trained(self, model: nn.Module) -> None:
        """model.pt, model.safetensors (the resolved config in its metadata; config.yaml beside it)
        and loss.png in the run directory."""
        if not self.run_dir:
            return
        torch.save(model.state_dict(), self.run_dir.path / "model.pt")
        save_safetensors(model, self.run_dir.path,
                         {"format": "pt", "raytorch_config": json.dumps(self.config.to_dict())})
        plot = self.run_dir.plot()
        self.say(f"Loss curve: {plot}" if plot
                 else "No loss curve drawn: it needs matplotlib (pip install 'raytorch[plot]')")

    def ended(self, result) -> None:
        """The callbacks' on_end: the result, or None where the run stopped on an error or a signal."""
        self.callbacks.call("on_end", result)
