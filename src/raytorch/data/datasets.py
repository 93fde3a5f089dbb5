"""Map-style datasets of (x, y) pairs, streams (IterableDataset) read by position, and fetching a
batch of either by index, now or ahead."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from .augment import seeded

Key = Optional[tuple[int, int]]  # (seed, epoch) of a training fetch: each sample's augmentation is seeded


class ArrayDataset(Dataset):
    """(x[i], y[i]) pairs backed by numpy arrays.

    numpy, not torch: Ray stores numpy arrays zero-copy, so replicas on one node that get the
    dataset from the object store all read one shared copy.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.tensor(self.x[i]), torch.tensor(self.y[i])

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The collated batch at `indices`: one fancy-index per array, no per-sample loop."""
        idx = np.asarray(indices, dtype=np.int64)
        # Fancy indexing copies, so the tensors are writable even when the arrays are
        # read-only views into Ray's object store.
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])


class NpyDataset(Dataset):
    """(x[i], y[i]) pairs read from two .npy files, for data that does not fit one node's memory.

    Each process that reads a sample memory-maps the files itself (np.load with mmap_mode="r"),
    so the operating system pages in only the rows asked for. Pickled, it is two paths and a
    length: what travels through Ray's object store is a few bytes, not the data.

    The files must be reachable at the same absolute path on every node that runs a replica (a
    shared filesystem, or copied there, e.g. by the cluster's file_mounts); relative paths are
    made absolute here, in the driver, because replicas run in another working directory.
    """

    def __init__(self, x_path: str | os.PathLike, y_path: str | os.PathLike):
        self.x_path, self.y_path = os.path.abspath(x_path), os.path.abspath(y_path)
        x, y = _open_npy(self.x_path), _open_npy(self.y_path)  # fail here, in the driver, not in a replica
        if len(x) != len(y):
            raise ValueError(f"{self.x_path} has {len(x)} samples but {self.y_path} has {len(y)}")
        self.length = len(x)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {"x_path": self.x_path, "y_path": self.y_path, "length": self.length}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _arrays=None)

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The two memory maps, opened on first use in this process."""
        if self._arrays is None:
            self._arrays = _open_npy(self.x_path), _open_npy(self.y_path)
        return self._arrays

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        x, y = self.arrays
        return torch.tensor(x[i]), torch.tensor(y[i])

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The collated batch at `indices`: one fancy-index per file, reading only those rows."""
        idx = np.asarray(indices, dtype=np.int64)
        # Fancy indexing copies the rows out of the map into plain, writable arrays.
        return tuple(torch.from_numpy(np.asarray(a[idx])) for a in self.arrays)


class Stream(Dataset):
    """An IterableDataset (data that is read, not indexed) made addressable by position in its
    stream: sample i of an epoch is the i-th item its iterator yields. The run plans steps by
    position as it plans them by index (in stream order: shuffling is the stream's own business,
    e.g. in set_epoch), and every replica iterates the stream, keeping the items of its part of
    each global batch and passing over the others without collating them. The run is then the one
    one process makes reading the stream in order, for a stream that yields the same items in every
    process: what it costs is that each replica reads the whole stream.

    Positions are taken in increasing order within an epoch (as the plan asks for them); an earlier
    one (a restore, evaluation again) starts the stream over. Before iterating epoch e the stream's
    set_epoch(e) is called where it has one (as Hugging Face's and WebDataset's streams do)."""

    def __init__(self, stream: IterableDataset, length: int):
        self.stream, self.length = stream, length
        self.__setstate__({})

    def __getstate__(self) -> dict:
        return {"stream": self.stream, "length": self.length}  # not the iterator: each process its own

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock(), iterator=None, epoch=None, position=0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int):
        return self.take([position])[0]

    def take(self, positions: Sequence[int], key: Key = None) -> list:
        """The items at `positions` (increasing) of the stream of the epoch in `key` (seed, epoch),
        each drawn within augment.seeded(seed, epoch, position); None: evaluation's."""
        epoch = None if key is None else key[1]
        with self.lock:
            if epoch != self.epoch or self.iterator is None or (len(positions) and positions[0] < self.position):
                self._start(epoch)
            items = []
            for position in map(int, positions):
                while self.position <= position:
                    try:
                        item = next(self.iterator) if key is None else self._next_seeded(key)
                    except StopIteration:
                        raise ValueError(f"the stream ended after {self.position} items in epoch {epoch}, but has "
                                         f"{self.length} in its first pass: a stream must yield as many items every "
                                         f"epoch and in every process") from None
                    self.position += 1
                items.append(item)
            return items

    def _next_seeded(self, key: tuple[int, int]):
        with seeded(*key, self.position):
            return next(self.iterator)

    def _start(self, epoch: Optional[int]) -> None:
        if epoch is not None and hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)
        self.iterator: Iterator = iter(self.stream)
        self.epoch, self.position = epoch, 0


def addressable(dataset: Any, say: Callable[[str], None]) -> Any:
    """`dataset` as the run plans it, by index: a map-style Dataset as it is; a ray.data.Dataset as
    a raydata.BlockDataset; an IterableDataset as a Stream, its length taken from len() where it has
    one, else counted by one pass here (said, with what holds for streams)."""
    from .raydata import BlockDataset, is_ray_dataset

    if is_ray_dataset(dataset):
        blocks = BlockDataset(dataset)
        say(f"the dataset is a ray.data.Dataset: {len(blocks)} rows in {len(blocks.refs)} blocks, kept as numpy in the "
            f"object store and read by index like any Dataset (shuffled per epoch; the contract holds)")
        return blocks
    if not isinstance(dataset, IterableDataset):
        return dataset
    try:
        length, how = len(dataset), "by its len()"
    except TypeError:
        length, how = sum(1 for _ in dataset), "counted by one pass (give it __len__ to skip that)"
    say(f"the dataset is a stream (IterableDataset) of {length} items an epoch, {how}: every replica reads it and "
        f"keeps its part of each global batch, in the stream's order (no shuffle: shuffle in the stream, by its "
        f"set_epoch(epoch)); equal to one process reading it in order where it yields the same items in every process")
    return Stream(dataset, length)


def _open_npy(path: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError as e:
        raise ValueError(f"{path}: no such file (it must exist at this path on every node)") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a memory-mappable .npy array ({e})") from e
    if not isinstance(array, np.ndarray) or array.ndim == 0:
        raise ValueError(f"{path}: not a .npy array of samples (got {type(array).__name__}, "
                         f"shape {getattr(array, 'shape', None)})")
    return array


def fetch(dataset: Dataset, indices: Sequence[int], key: Key = None, collate: Optional[Callable] = None):
    """Collate the samples at `indices` into one batch, the way DataLoader would: by `collate`
    (the user's collate_fn: the list of items to the batch), else default_collate; with `key`, each
    sample is fetched within augment.seeded(*key, index)."""
    if collate is None and isinstance(dataset, (ArrayDataset, NpyDataset)):
        return dataset.batch(indices)  # default_collate's answer, without making an item per sample
    collate = collate or default_collate
    if isinstance(dataset, Stream):
        return collate(dataset.take(indices, key))
    getitems = getattr(dataset, "__getitems__", None)  # torch's batched-fetch protocol
    return collate(getitems(list(indices)) if getitems else [item(dataset, i, key) for i in indices])


def item(dataset: Dataset, index: int, key: Key = None):
    """dataset[index]; with `key`, its augmentation seeded (augment.sample_generator)."""
    if key is None:
        return dataset[int(index)]
    with seeded(*key, int(index)):
        return dataset[int(index)]


class Prefetcher:
    """Fetches the batches of the next steps in background threads while the current step computes
    (TrainConfig.loader_workers): a `__getitem__` that reads or decodes no longer stalls a step.

    One thread fetches batches in the order asked; the samples of a batch come from `workers`
    threads at once (I/O and most decoding release the GIL), then are collated. `prepare` runs on
    each batch in the background too (pinning a GPU replica's batch); `collate` as fetch's."""

    def __init__(self, workers: int, prepare: Optional[Callable[[Any], Any]] = None,
                 collate: Optional[Callable] = None):
        self.batches = ThreadPoolExecutor(1, thread_name_prefix="raytorch-prefetch")
        self.samples = ThreadPoolExecutor(workers, thread_name_prefix="raytorch-loader")
        self.prepare = prepare or (lambda batch: batch)
        self.collate = collate
        self.pending: dict[bytes, Future] = {}

    def ahead(self, dataset: Dataset, indices: np.ndarray, key: Key = None) -> None:
        """Start fetching the batch at `indices` (key: see fetch)."""
        name = (np.asarray(indices).tobytes(), key)
        if name not in self.pending:
            self.pending[name] = self.batches.submit(self._fetch, dataset, indices, key)

    def get(self, dataset: Dataset, indices: np.ndarray, key: Key = None):
        """The batch at `indices`: the one fetched ahead, or fetched now."""
        future = self.pending.pop((np.asarray(indices).tobytes(), key), None)
        return future.result() if future is not None else self._fetch(dataset, indices, key)

    def _fetch(self, dataset: Dataset, indices: np.ndarray, key: Key):
        if isinstance(dataset, (ArrayDataset, NpyDataset, Stream)) or hasattr(dataset, "__getitems__"):
            return self.prepare(fetch(dataset, indices, key, self.collate))
        samples = self.samples.map(lambda index: item(dataset, index, key), indices)
        return self.prepare((self.collate or default_collate)(list(samples)))

    def clear(self) -> None:
        """Forget batches fetched ahead (the steps they were for will not come: a restore)."""
        self.pending.clear()
