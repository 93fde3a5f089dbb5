"""Splitting each batch by replica speed (--split adaptive): per-replica speed estimates, pure.

The contract weights each replica's gradient by its sample count, so the update does not depend
on how a global batch is cut: a slow replica can take a smaller part and nobody waits for it.
"""

from __future__ import annotations

from typing import Optional, Sequence

# A move of the cut points must save at least this much per step, besides `tolerance` of it: two
# equal replicas measure a few percent apart (one shares a core with the driver), and on a short
# step that is a fraction of a millisecond, not worth an uneven split that reads as a fault.
MIN_SAVING_S = 0.001
# A split whose largest part is this many times the even part (or smallest 1/this) is explained.
FAR_FROM_EVEN = 1.25


class SpeedEstimate:
    """Each replica's step time as a line, fixed + per_sample * samples, from the steps it ran.

    per_sample comes from a step's forward and backward (seconds / samples), fixed from the rest
    of the replica's own work on the step (applying the all-reduce, the optimizer step, publishing
    its gradient; waits for peers left out). Both are exponential moving averages over steps (a
    step weighted `alpha`), so one noisy step moves them little and a replica that slows down
    sharply is followed within a few steps. Each replica's first `warmup` steps are left out (a
    fresh process allocates as it goes). A replica without a measurement counts as the average.
    """

    def __init__(self, replicas: int, alpha: float = 0.2, warmup: int = 1):
        self.alpha, self.warmup = alpha, warmup
        self.per_sample: list[Optional[float]] = [None] * replicas
        self.fixed: list[Optional[float]] = [None] * replicas
        self.seen = [0] * replicas

    def observe(self, replica: int, samples: int, compute_s: float, other_s: float = 0.0) -> None:
        """One step of `replica`: `samples` samples took `compute_s` forward and backward, and
        `other_s` of its other work."""
        self.seen[replica] += 1
        if self.seen[replica] <= self.warmup:
            return
        if samples > 0 and compute_s > 0:
            self.per_sample[replica] = self._smoothed(self.per_sample[replica], compute_s / samples)
        if samples > 0 and other_s >= 0:
            self.fixed[replica] = self._smoothed(self.fixed[replica], other_s)

    def _smoothed(self, old: Optional[float], value: float) -> float:
        return value if old is None else (1 - self.alpha) * old + self.alpha * value

    def shares(self, samples: int, current: Optional[Sequence[float]] = None, tolerance: float = 0.05,
               floor: float = 0.05, min_saving_s: float = MIN_SAVING_S) -> Optional[list[float]]:
        """The split for a batch of `samples`: the balanced one (see balanced), unless the `current`
        split (parts in any proportion; None: even) is predicted to take at most `tolerance` longer
        per step, or less than `min_saving_s` seconds longer: then the current one, so that
        measurement noise moves no cut point while a replica that really slows down does. None
        (even) until a replica is measured."""
        balanced = self.balanced(samples, floor)
        if balanced is None:
            return None
        kept = [samples / len(balanced)] * len(balanced) if current is None else [
            samples * part / sum(current) for part in current]
        saving = self.step_time(kept) - self.step_time(balanced)
        if saving <= tolerance * self.step_time(balanced) or saving < min_saving_s:
            return None if current is None else list(current)
        return balanced

    def uneven(self, parts: Sequence[float], far: float = FAR_FROM_EVEN) -> Optional[tuple[int, int, float]]:
        """Where `parts` (a split, by position) is far from even: the replica with the smallest part,
        the one with the largest, and how many times longer the first takes per sample; None where
        the split is near even or nothing is measured."""
        if len(parts) < 2 or all(v is None for v in self.per_sample) or not sum(parts):
            return None
        mean = sum(parts) / len(parts)
        if max(parts) <= far * mean and min(parts) >= mean / far:
            return None
        _, b = self._lines()
        small, large = parts.index(min(parts)), parts.index(max(parts))
        return small, large, b[small] / b[large]

    def step_time(self, parts: Sequence[float]) -> float:
        """The predicted seconds of a step split into `parts`: the last replica to finish."""
        a, b = self._lines()
        return max(a[r] + b[r] * n for r, n in enumerate(parts))

    def balanced(self, samples: int, floor: float = 0.05) -> Optional[list[float]]:
        """How many of a batch's `samples` each replica should take (fractional) so that all finish
        the step together; None until one replica is measured.

        Solves fixed_r + per_sample_r * n_r = T for all r with sum n_r = samples. A replica gets
        at least `floor` of the mean part and one sample where there are enough (one that got no
        samples could never be measured faster again; one whose fixed work alone exceeds T is held
        at the floor).
        """
        if all(v is None for v in self.per_sample):
            return None
        a, b = self._lines()
        least = max(floor * samples / len(b), 1.0 if samples >= len(b) else 0.0)
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

    def _lines(self) -> tuple[list[float], list[float]]:
        """(fixed, per_sample) of every replica; an unmeasured one gets the measured ones' mean."""
        known = [r for r, v in enumerate(self.per_sample) if v is not None]
        mean_b = sum(self.per_sample[r] for r in known) / len(known)
        mean_a = sum(self.fixed[r] or 0.0 for r in known) / len(known)
        b = [v if v is not None else mean_b for v in self.per_sample]
        a = [(self.fixed[r] or 0.0) if self.per_sample[r] is not None else mean_a for r in range(len(b))]
        return a, b
