"""Data: datasets addressed by index (map-style, `.npy` files, streams read by position, a
`ray.data.Dataset` by block and row), fetched by index now or ahead, with per-sample seeded
augmentation. Plain PyTorch and numpy; Ray only to read a `ray.data.Dataset`'s blocks.

Imports: `raytorch.errors`, `raytorch.config`, `raytorch.core`."""

from .augment import sample_generator, seeded
from .datasets import ArrayDataset, NpyDataset, Stream, addressable, fetch

__all__ = ["ArrayDataset", "NpyDataset", "Stream", "addressable", "fetch", "sample_generator", "seeded"]
