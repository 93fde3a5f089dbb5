"""The randomness of one replica's training forwards: each runs within core/seeded_forward.py's
context (dropout placed per sample), and what it drew that cannot be placed is reported once."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

from ..core.seeded_forward import SeededForward, seeded_forward


class ForwardDraws:
    """Seeds each training forward's dropout by (seed, step, samples); collects the unplaced draws."""

    def __init__(self, seed: int):
        self.seed = seed
        self.layouts: dict[int, int] = {}  # where each dropout call site holds its samples
        self.unplaced: set[str] = set()  # random calls of the forwards not placed per sample
        self.told: set[str] = set()  # those already reported

    @contextmanager
    def forward(self, step: int, samples: np.ndarray) -> Iterator[SeededForward]:
        """Within: the training forward of global step `step` on the samples at `samples`."""
        with seeded_forward(self.seed, step, samples, self.layouts) as drawn:
            yield drawn
        self.unplaced |= drawn.unplaced

    def untold(self) -> tuple[str, ...]:
        """The unplaced random calls not reported yet."""
        news = tuple(sorted(self.unplaced - self.told))
        self.told |= self.unplaced
        return news
