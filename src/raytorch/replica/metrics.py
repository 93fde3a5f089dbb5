"""A replica's Ray metrics (ray.util.metrics), beside the driver's (output/metrics.py): the time
its all-reduce takes and its peak memory, tagged by run and replica."""

from __future__ import annotations

from ray.util import metrics

from ..output.metrics import STEP_BOUNDARIES


class ReplicaMetrics:
    """A replica's metrics: the time its all-reduce takes (reading and summing its peers' gradients,
    waiting for them included), observed once per call as the mean over the call's steps."""

    def __init__(self, run: str, replica: str):
        self.tags = {"run": run, "replica": replica}
        self.allreduce = metrics.Histogram("raytorch_allreduce_seconds", "All-reduce time per step, per replica",
                                           boundaries=STEP_BOUNDARIES, tag_keys=("run", "replica"))
        self.peak = metrics.Gauge("raytorch_replica_peak_memory_bytes", "Peak memory per replica: RSS on CPU, "
                                  "allocated on a GPU", tag_keys=("run", "replica"))

    def allreduced(self, seconds_per_step: float, peak_bytes: int) -> None:
        """Once per call: the mean all-reduce time of its steps, and the replica's peak memory so far."""
        self.allreduce.observe(seconds_per_step, tags=self.tags)
        self.peak.set(peak_bytes, tags=self.tags)
