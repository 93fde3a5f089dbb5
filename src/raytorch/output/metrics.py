"""A run's figures as Ray metrics (ray.util.metrics): each node's Prometheus endpoint serves them
(with Ray's `ray_` prefix; counters end in `_total`), Grafana and the dashboard's Metrics page show
them (docs/grafana/raytorch.json). Tagged by run. These are the driver's; each replica's own (the
time its all-reduce takes, tagged by replica too) are replica/metrics.py's.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

from ray.util import metrics

from .callbacks import Callback

# Ray drops a gauge ~2 export intervals (20 s by default) after its last set(): set them again
# while the run lives, so a slow epoch does not blank the dashboard.
REFRESH_S = 5.0
STEP_BOUNDARIES = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]


class RunMetrics(Callback):
    """The driver's metrics of one run, set from its records."""

    def __init__(self, run: str, shares: bool = False):
        self.tags = {"run": run}
        self.shares = shares  # per-replica share gauges: an adaptive split (an even one says nothing per replica)
        keys = ("run",)
        self.gauges = {
            name: metrics.Gauge(f"raytorch_{name}", description, tag_keys=keys)
            for name, description in (
                ("train_loss", "Running mean train loss of the current epoch"),
                ("eval_loss", "Eval loss after the last epoch"),
                ("eval_accuracy", "Eval accuracy after the last epoch (classifiers)"),
                ("epoch", "Epoch in progress"),
                ("step", "Global steps done"),
                ("samples_per_second", "Training samples per second over the current epoch"),
                ("workers", "Replicas training"),
            )
        }
        self.steps = metrics.Counter("raytorch_steps", "Optimizer steps taken", tag_keys=keys)
        self.samples = metrics.Counter("raytorch_samples", "Training samples processed", tag_keys=keys)
        self.restarts = metrics.Counter("raytorch_replica_restarts", "Replicas lost and replaced (or dropped)",
                                        tag_keys=keys)
        self.step_time = metrics.Histogram("raytorch_step_seconds", "Wall time per step, seen by the driver",
                                           boundaries=STEP_BOUNDARIES, tag_keys=keys)
        self.share = metrics.Gauge("raytorch_replica_share", "Fraction of the last step's batch each replica took",
                                   tag_keys=("run", "replica"))
        self.values: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.refresher = threading.Thread(target=self._refresh, name="raytorch-metrics", daemon=True)
        self.refresher.start()

    # -- the records ---------------------------------------------------------------------------------

    def on_start(self, run: dict) -> None:
        self.set(workers=len(run["replicas"]))

    def on_steps(self, records: list[dict]) -> None:
        """One gathering's steps: counters and the step-time histogram once, the gauges from the last."""
        last = records[-1]
        self.stepped(len(records), sum(r["samples"] for r in records), last["seconds_per_step"])
        self.set(step=last["step"], epoch=last["epoch"], samples_per_second=last["samples_per_s"],
                 train_loss=last["running_loss"])
        if self.shares:
            total = max(1, sum(last["split"]))
            self.split({name: n / total for name, n in zip(last["replicas"], last["split"])})

    def on_epoch(self, record: dict) -> None:
        loss = record["loss"]
        self.set(train_loss=None if math.isnan(loss) else loss, eval_loss=record["eval_loss"],
                 eval_accuracy=record["eval_accuracy"])

    def on_replica_lost(self, record: dict) -> None:
        self.restarted(len(record["replicas"]))
        self.set(workers=record["workers"])

    def on_record(self, record: dict) -> None:
        if record["event"] == "replica_joined":
            self.set(workers=record["workers"])
        super().on_record(record)

    # -- the gauges ----------------------------------------------------------------------------------

    def set(self, **values: Optional[float]) -> None:
        """Set gauges by short name (train_loss=..., epoch=...); None leaves one as it is."""
        with self.lock:
            for name, value in values.items():
                if value is not None:
                    self.values[name] = float(value)
                    self.gauges[name].set(float(value), tags=self.tags)

    def stepped(self, steps: int, samples: int, seconds_per_step: float) -> None:
        self.steps.inc(steps, tags=self.tags)
        self.samples.inc(samples, tags=self.tags)
        self.step_time.observe(seconds_per_step, tags=self.tags)

    def split(self, fractions: dict[str, float]) -> None:
        """The last step's batch fraction per replica (named replica-<rank>)."""
        for replica, fraction in fractions.items():
            self.share.set(fraction, tags={**self.tags, "replica": replica})

    def restarted(self, replicas: int) -> None:
        self.restarts.inc(replicas, tags=self.tags)

    def close(self) -> None:
        self.stopped.set()

    def _refresh(self) -> None:
        while not self.stopped.wait(REFRESH_S):
            with self.lock:
                for name, value in self.values.items():
                    self.gauges[name].set(value, tags=self.tags)
