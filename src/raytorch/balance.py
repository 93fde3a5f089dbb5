"""Splitting each batch by replica speed (--split adaptive): per-replica speed estimates, pure.

The contract weights each replica's gradient by its sample count, so the update does not depend
on how a global batch is cut: a slow replica can take a smaller part and nobody waits for it.
"""

from __future__ import annotations

from typing import Optional


class SpeedEstimate:
    """Smoothed seconds per sample of each replica, from the compute time of the steps it ran.

    An exponential moving average over steps (a step's time per sample, weighted `alpha`), so one
    noisy step moves it little and a replica that slows down sharply is followed within a few
    steps. A replica without a measurement yet counts as the average of the others.
    """

    def __init__(self, replicas: int, alpha: float = 0.2):
        self.alpha = alpha
        self.per_sample: list[Optional[float]] = [None] * replicas

    def observe(self, replica: int, samples: int, seconds: float) -> None:
        if samples <= 0 or seconds <= 0:
            return
        value = seconds / samples
        old = self.per_sample[replica]
        self.per_sample[replica] = value if old is None else (1 - self.alpha) * old + self.alpha * value

    def shares(self, floor: float = 0.05) -> Optional[list[float]]:
        """Each replica's share of a batch, in proportion to its speed, but at least `floor` of the
        mean share (a replica that got no samples could never be measured faster again); None
        until one is measured."""
        known = [v for v in self.per_sample if v is not None]
        if not known:
            return None
        mean = sum(known) / len(known)
        speeds = [1.0 / (v if v is not None else mean) for v in self.per_sample]
        least = floor * sum(speeds) / len(speeds)
        return [max(speed, least) for speed in speeds]
