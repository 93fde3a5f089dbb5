"""The shared-memory wire: replicas on one node read each other's gradients straight from /dev/shm,
ordered by counters in each replica's control block, not by the driver."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..core.reduce import chunk_bounds, weighted_sum
from .protocol import PeerFailed, sum_whole, weighted_loss

SHM_DIR = Path("/dev/shm")
PEER_TIMEOUT_S = 120.0
# A replica's control block: three step counters (gradient published, reduced chunk published,
# update applied), a flag, and the local loss published with each of the two gradient buffers
# (float64 bits).
PUBLISHED, APPLIED, FAILED, REDUCED = 0, 1, 2, 3
LOSS = 4
CONTROL = LOSS + 2
LIVENESS_CHECK_S = 0.1


class Buffers(NamedTuple):
    """A replica's shared-memory buffers: two gradients and two reduced chunks (alternating by
    step), and its control block."""

    grads: list[np.ndarray]
    reduced: list[np.ndarray]
    control: np.ndarray


def created(path: str, dtype, numel: int) -> np.memmap:
    """A new file in /dev/shm of `numel` elements, mapped read-write: made 0600 (this user's replicas
    alone can read the gradients and parameters in it), and refused where the name exists already
    or is a link (O_EXCL | O_NOFOLLOW): nobody else's file is ever written through it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "r+b") as f:
        f.truncate(numel * np.dtype(dtype).itemsize)
        return np.memmap(f, dtype=dtype, mode="r+", shape=(numel,))


class SharedMemoryWire:
    """Replicas on one node read each other's gradients straight from /dev/shm.

    The driver no longer has to wait for step k before it sends step k + 1: replicas order
    themselves through two counters per replica (last step published, last step applied) and
    two gradient buffers, alternating by step. A replica publishing step k's gradient first waits
    until every peer has applied step k - 2 (the last reader of that buffer); a replica reading a
    peer's step-k gradient first waits until the peer has published step k. So the driver is off
    the critical path, and a step costs compute plus a memory read.

    The all-reduce is a reduce-scatter and an all-gather: replica p owns chunk p of the flat
    gradient (chunk_bounds), sums that chunk of every routed gradient into its own `reduced` buffer
    and publishes it (a third counter, REDUCED), then copies every peer's reduced chunk. Each
    replica reads about two gradients' worth per step whatever the number of replicas, not one per
    peer. A reduced buffer of step k is rewritten at step k + 2, after its owner has published step
    k + 2's gradient, which waits for every peer to have applied step k: no reader is left behind.
    With two replicas both ways read two gradients; each replica then sums them whole, one wait less.

    The counters are plain stores and loads: correct under x86's total store order, which is why
    `shared_memory_available` is false elsewhere.
    """

    kind = "shared_memory"

    def __init__(self, rank: int, numel: int, dtype: np.dtype, prefix: str, step: int = 0, world: int = 1,
                 shared: Sequence[str] = ()):
        """Buffers for the replica at wire position `rank` of `world`, whose next gradient is for
        global step `step`; `shared`: with a sharded update (sharded.py), the names of what the replicas
        step together in shared buffers ('params', then the optimizer's state by its keys)."""
        self.rank = rank
        self.chunks = chunk_bounds(numel, world)
        # with a sharded update, the replica at position 0 also makes the buffers (two of each
        # shared name) every replica's model and optimizer state live in (see gather_params)
        names = ("grad0", "grad1", "reduced0", "reduced1", "control") + tuple(
            f"{name}{parity}" for name in shared for parity in (0, 1)) * (rank == 0)
        self.paths = [str(SHM_DIR / f"{prefix}-rank{rank}-{name}") for name in names]
        grads = [created(p, dtype, numel) for p in self.paths[:2]]
        chunks = [created(p, dtype, self._size(rank)) for p in self.paths[2:4]]
        control = created(self.paths[4], np.int64, CONTROL)
        control[:LOSS] = [step - 1, step - 1, 0, step - 1]
        self.own = Buffers(grads, chunks, control)
        self.shared_names = list(shared)
        self.shared = self._map(self.paths[5:], dtype, numel, "w+")  # name -> its two buffers, by parity
        self.peers: dict[int, Buffers] = {rank: self.own}
        self.pids: dict[int, int] = {}
        self.abandoned: set[int] = set()  # peers the driver declared dead (hung): stop waiting for them
        self.waited = 0.0  # seconds spent waiting for peers, in all: not this replica's own work
        self.buffer_bytes = sum(a.nbytes for a in grads + chunks + sum(self.shared.values(), []))

    def _size(self, rank: int) -> int:
        """Elements of the reduced buffer of the replica at `rank`: its chunk (a file cannot be empty)."""
        lo, hi = self.chunks[rank]
        return max(1, hi - lo)

    def _map(self, paths: Sequence[str], dtype: np.dtype, numel: int, mode: str) -> dict[str, list[np.ndarray]]:
        """The shared buffers at `paths` (two per name of shared_names, in order), mapped."""
        buffers = [created(path, dtype, numel) if mode == "w+" else
                   np.memmap(path, dtype=dtype, mode=mode, shape=(numel,)) for path in paths]
        return {name: buffers[2 * i:2 * i + 2] for i, name in enumerate(self.shared_names) if buffers}

    def attach(self, paths_by_rank: dict[int, list[str]], pids_by_rank: dict[int, int]) -> None:
        """Map every peer's buffers and control block, read-only, and the shared buffers position 0
        made (a sharded update's) read-write; remember each peer's pid to notice its death."""
        grad = self.own.grads[0]
        self.pids = dict(pids_by_rank)
        for rank, paths in paths_by_rank.items():
            if rank != self.rank:
                grads = [np.memmap(p, dtype=grad.dtype, mode="r", shape=grad.shape) for p in paths[:2]]
                chunks = [np.memmap(p, dtype=grad.dtype, mode="r", shape=(self._size(rank),)) for p in paths[2:4]]
                control = np.memmap(paths[4], dtype=np.int64, mode="r", shape=(CONTROL,))
                self.peers[rank] = Buffers(grads, chunks, control)
                if paths[5:] and not self.shared:
                    self.shared = self._map(paths[5:], grad.dtype, grad.size, "r+")

    def unlink(self) -> None:
        """Remove the names once every peer has mapped them: the mappings live on, and nothing is
        left in /dev/shm even if this process is killed."""
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):  # removed already (a wire set up again)
                os.unlink(path)

    def target(self, step: int) -> torch.Tensor:
        """The buffer step `step`'s gradient goes into, once no peer reads it any more: backward's
        gradients are gathered straight into it (no copy to publish)."""
        for rank, peer in self.peers.items():
            if rank != self.rank:
                self._wait(rank, lambda c=peer.control: c[APPLIED] >= step - 2, f"to apply step {step - 2}")
        return torch.from_numpy(self.own.grads[step % 2])

    def publish(self, flat: torch.Tensor, step: int, loss: float) -> tuple[int, int]:
        if flat.data_ptr() != self.own.grads[step % 2].ctypes.data:  # not gathered in place (target)
            self.target(step).copy_(flat)
        self.own.control[LOSS:].view(np.float64)[step % 2] = loss
        self.own.control[PUBLISHED] = step  # last: a peer that sees the step sees its buffer and loss
        return self.rank, step

    def read(self, token: tuple[int, int]) -> tuple[np.ndarray, float]:
        """A peer's gradient of a step, and the local loss published with it."""
        rank, step = token
        peer = self.peers[rank]
        self._wait(rank, lambda: peer.control[PUBLISHED] >= step, f"to publish step {step}")
        return peer.grads[step % 2], float(peer.control[LOSS:].view(np.float64)[step % 2])

    def all_reduce(self, items: Sequence[tuple[int, int]], grad_weights: Sequence[float],
                   loss_weights: Sequence[float], out: torch.Tensor) -> float:
        """out = sum of grad_weights[i] * the gradient at token items[i], in order (reduce-scatter,
        then all-gather; see the class); returns the sum of loss_weights[i] * its local loss."""
        if len(self.chunks) <= 2:  # see the class: two replicas sum whole gradients
            return weighted_loss(loss_weights, sum_whole(self.read, items, grad_weights, out))
        step = items[0][1]
        loss, _ = self.reduce_scatter(items, grad_weights, loss_weights)
        self.own.control[REDUCED] = step
        gathered = out.numpy()
        for rank in sorted(self.peers):  # all-gather: every replica's reduced chunk, in place
            peer, (start, end) = self.peers[rank], self.chunks[rank]
            if end > start:
                self._wait(rank, lambda c=peer.control: c[REDUCED] >= step, f"to reduce step {step}")
                gathered[start:end] = peer.reduced[step % 2][:end - start]
        return loss

    def reduce_scatter(self, tokens: Sequence[tuple[int, int]], grad_weights: Sequence[float],
                       loss_weights: Sequence[float]) -> tuple[float, torch.Tensor]:
        """This replica's chunk of the sum of grad_weights[i] * the gradient at tokens[i], summed in
        order into its reduced buffer, and the global loss (as all_reduce)."""
        step = tokens[0][1]
        lo, hi = self.chunks[self.rank]
        read = [self.read(token) for token in tokens]
        mine = torch.from_numpy(self.own.reduced[step % 2][:hi - lo])
        if hi > lo:
            weighted_sum([grad[lo:hi] for grad, _ in read], grad_weights, out=mine)
        return weighted_loss(loss_weights, [loss for _, loss in read]), mine

    def gather_params(self, step: int) -> dict[str, np.ndarray]:
        """Publish that this replica has stepped its chunk of the parameters (and of the optimizer's
        state) into the shared buffers of `step`'s parity, wait until every peer has stepped its
        own, and return those buffers by name: whole now, each chunk stepped once, by its owner. No
        model is moved onto them before every chunk is there, so a peer lost on the way leaves
        every model at the previous step. They are written again at step `step` + 2, by a replica
        that has read every peer's gradient of that step: every peer has moved its model off them
        by then (onto the buffers of step `step` + 1)."""
        self.own.control[REDUCED] = step
        for rank, peer in sorted(self.peers.items()):
            self._wait(rank, lambda c=peer.control: c[REDUCED] >= step, f"to step its chunk of step {step}")
        return self.shared_of(step)

    def shared_of(self, step: int) -> dict[str, np.ndarray]:
        """The shared buffers (a sharded update's) of `step`'s parity, by name."""
        return {name: pair[step % 2] for name, pair in self.shared.items()}

    def applied(self, step: int) -> None:
        self.own.control[APPLIED] = step

    def fail(self) -> None:
        """Tell the peers this replica failed, so none of them waits for it."""
        self.own.control[FAILED] = 1

    def abandon(self, rank: int) -> None:
        """Stop waiting for the peer at `rank` (called from another thread while this one may wait)."""
        self.abandoned.add(rank)

    def _wait(self, rank: int, ready, what: str) -> None:
        if ready():
            return
        control = self.peers[rank].control
        started = checked = time.monotonic()
        pause = 0.0
        while not ready():
            now = time.monotonic()
            if control[FAILED] or rank in self.abandoned:
                raise PeerFailed(f"replica {rank} failed while this one waited for it {what}")
            if now - checked > LIVENESS_CHECK_S:
                checked = now
                if not _alive(self.pids.get(rank)):
                    raise PeerFailed(f"replica {rank} died while this one waited for it {what}")
                if now - started > PEER_TIMEOUT_S:
                    raise PeerFailed(f"replica {rank} did not answer within {PEER_TIMEOUT_S:g} s ({what})")
            time.sleep(pause)  # sleep(0) yields the core; back off to 100 us if the peer is far behind
            pause = min(1e-4, pause + 1e-6)
        self.waited += time.monotonic() - started


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
