"""Random augmentation that any number of replicas reproduces: while raytorch fetches a training
sample, `sample_generator()` is a torch.Generator seeded by (seed, epoch, sample index), so a
sample's random crop or noise is the same whichever replica, loader thread or W fetches it.

    def __getitem__(self, i):
        image = load(i)
        return augment(image, generator=raytorch.sample_generator()), label(i)

Outside raytorch's fetch (evaluation, a plain DataLoader) it is torch's default generator. A plain
PyTorch loop reproduces raytorch's run by fetching sample i of epoch e within `seeded(seed, e, i)`.
torch's global generator (torch.rand without generator=) is not seeded per sample: loader threads
share it, so augmentation drawn from it depends on W and timing.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

_fetching = threading.local()  # the generator of the sample this thread fetches, if any


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index` in `epoch` of a run seeded `seed` (63 bits, from a hash: nearby
    samples get unrelated streams)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(seed: int, epoch: int, index: int) -> Iterator[torch.Generator]:
    """Within: sample_generator() is seeded for sample `index` of `epoch` (in this thread)."""
    before = getattr(_fetching, "generator", None)
    _fetching.generator = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    try:
        yield _fetching.generator
    finally:
        _fetching.generator = before


def sample_generator() -> torch.Generator:
    """The generator for the sample being fetched: seeded per (seed, epoch, sample) while raytorch
    fetches a training sample, else torch's default generator."""
    return getattr(_fetching, "generator", None) or torch.default_generator
