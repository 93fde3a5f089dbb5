"""Splitting each batch by replica speed (--split adaptive): per-replica speed estimates, pure.

The contract weights each replica's gradient by its sample count, so the update does not depend
on how a global batch is cut: a slow replica can take a smaller part and nobody waits for it.
"""

from __future__ import annotations

from typing import Optional


class SpeedEstimate:
    """Each replica's step time as a line, fixed + per_sample * samples, from the steps it ran.

    per_sample comes from a step's forward and backward (seconds / samples), fixed from the rest
    of the replica's own work on the step (applying the all-reduce, the optimizer step, publishing
    its gradient; waits for peers left out). Both are exponential moving averages over steps (a
    step weighted `alpha`), so one noisy step moves them little and a replica that slows down
    sharply is followed within a few steps. A replica without a measurement counts as the average.
    """

    def __init__(self, replicas: int, alpha: float = 0.2):
        self.alpha = alpha
        self.per_sample: list[Optional[float]] = [None] * replicas
        self.fixed: list[Optional[float]] = [None] * replicas

    def observe(self, replica: int, samples: int, compute_s: float, other_s: float = 0.0) -> None:
        """One step of `replica`: `samples` samples took `compute_s` forward and backward, and
        `other_s` of its other work."""
        if samples > 0 and compute_s > 0:
            self.per_sample[replica] = self._smoothed(self.per_sample[replica], compute_s / samples)
        if samples > 0 and other_s >= 0:
            self.fixed[replica] = self._smoothed(self.fixed[replica], other_s)

    def _smoothed(self, old: Optional[float], value: float) -> float:
        return value if old is None else (1 - self.alpha) * old + self.alpha * value

    def shares(self, samples: int, floor: float = 0.05) -> Optional[list[float]]:
        """How many of a batch's `samples` each replica should take (fractional) so that all finish
        the step together; None until one replica is measured.

        Solves fixed_r + per_sample_r * n_r = T for all r with sum n_r = samples. A replica would
        get at least `floor` of the mean part (one that got no samples could never be measured
        faster again, and one whose fixed work alone exceeds T is held at the floor).
        """
        known = [r for r, v in enumerate(self.per_sample) if v is not None]
        if not known:
            return None
        mean_b = sum(self.per_sample[r] for r in known) / len(known)
        mean_a = sum(self.fixed[r] or 0.0 for r in known) / len(known)
        b = [v if v is not None else mean_b for v in self.per_sample]
        a = [(self.fixed[r] or 0.0) if self.per_sample[r] is not None else mean_a for r in range(len(b))]
        least = floor * samples / len(b)
        parts: list[Optional[float]] = [None] * len(b)  # None: still free to balance
        while True:
            free = [r for r in range(len(b)) if parts[r] is None]
            left = samples - sum(p for p in parts if p is not None)
            finish = (left + sum(a[r] / b[r] for r in free)) / sum(1 / b[r] for r in free)
            low = [r for r in free if (finish - a[r]) / b[r] < least]
            if not low or len(low) == len(free):
                for r in free:
                    parts[r] = max(least, (finish - a[r]) / b[r])
                return parts
            for r in low:
                parts[r] = least
