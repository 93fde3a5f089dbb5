"""How a replica hands its gradient to its peers: the transport half of the all-reduce.

The driver decides every step and tells each replica which gradients to sum, with which weights;
a wire decides how those gradients travel. Both give every replica the same arrays in the same
order, so the reduced gradient has the same bits either way.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

SHM_DIR = Path("/dev/shm")
PEER_TIMEOUT_S = 120.0
PUBLISHED, APPLIED, FAILED = 0, 1, 2  # a replica's control block: two step counters, a flag,
LOSS = 3  # and the local loss published with each of the two gradient buffers (float64 bits)
LIVENESS_CHECK_S = 0.1


class PeerFailed(RuntimeError):
    """A peer this replica waits for failed or died: this replica stops too, as a consequence."""


class ObjectStoreWire:
    """The gradient is the step's return value: Ray copies it into the object store once, peers on
    the same node read it zero-copy, other nodes fetch it. The driver passes the references on, so
    Ray itself orders each step after the previous one."""

    kind = "object_store"
    waited = 0.0  # Ray resolves the peers' gradients before a call starts: no wait inside one

    def publish(self, flat: torch.Tensor, step: int, loss: float) -> tuple[np.ndarray, float]:
        return flat.detach().cpu().numpy(), loss

    def read(self, item: tuple[np.ndarray, float]) -> tuple[np.ndarray, float]:
        """A peer's gradient and the local loss that came with it."""
        return item

    def applied(self, step: int) -> None:
        pass

    def fail(self) -> None:
        pass

    def abandon(self, rank: int) -> None:
        pass  # a dead peer's objects fail by themselves: Ray reports the actor's death


class SharedMemoryWire:
    """Replicas on one node read each other's gradients straight from /dev/shm.

    The driver no longer has to wait for step k before it sends step k + 1: replicas order
    themselves through two counters per replica (last step published, last step applied) and
    two gradient buffers, alternating by step. A replica publishing step k's gradient first waits
    until every peer has applied step k - 2 (the last reader of that buffer); a replica reading a
    peer's step-k gradient first waits until the peer has published step k. So the driver is off
    the critical path, and a step costs compute plus a memory read.

    The counters are plain stores and loads: correct under x86's total store order, which is why
    `shared_memory_available` is false elsewhere.
    """

    kind = "shared_memory"

    def __init__(self, rank: int, numel: int, dtype: np.dtype, prefix: str, step: int = 0):
        """Buffers for the replica at wire position `rank`, whose next gradient is for global step `step`."""
        self.rank = rank
        self.paths = [str(SHM_DIR / f"{prefix}-rank{rank}-{name}") for name in ("grad0", "grad1", "control")]
        self.grads = [np.memmap(p, dtype=dtype, mode="w+", shape=(numel,)) for p in self.paths[:2]]
        self.control = np.memmap(self.paths[2], dtype=np.int64, mode="w+", shape=(LOSS + 2,))
        self.control[:LOSS] = [step - 1, step - 1, 0]
        self.peers: dict[int, tuple[list[np.ndarray], np.ndarray]] = {rank: (self.grads, self.control)}
        self.pids: dict[int, int] = {}
        self.abandoned: set[int] = set()  # peers the driver declared dead (hung): stop waiting for them
        self.waited = 0.0  # seconds spent waiting for peers, in all: not this replica's own work

    def attach(self, paths_by_rank: dict[int, list[str]], pids_by_rank: dict[int, int]) -> None:
        """Map every peer's buffers and control block, read-only; remember its pid to notice its death."""
        grad = self.grads[0]
        self.pids = dict(pids_by_rank)
        for rank, paths in paths_by_rank.items():
            if rank != self.rank:
                grads = [np.memmap(p, dtype=grad.dtype, mode="r", shape=grad.shape) for p in paths[:2]]
                self.peers[rank] = (grads, np.memmap(paths[2], dtype=np.int64, mode="r", shape=(LOSS + 2,)))

    def unlink(self) -> None:
        """Remove the names once every peer has mapped them: the mappings live on, and nothing is
        left in /dev/shm even if this process is killed."""
        for path in self.paths:
            os.unlink(path)

    def publish(self, flat: torch.Tensor, step: int, loss: float) -> tuple[int, int]:
        for rank, (_, control) in self.peers.items():
            if rank != self.rank:
                self._wait(rank, lambda c=control: c[APPLIED] >= step - 2, f"to apply step {step - 2}")
        self.grads[step % 2][:] = flat.detach().cpu().numpy()
        self.control[LOSS:].view(np.float64)[step % 2] = loss
        self.control[PUBLISHED] = step  # last: a peer that sees the step sees its buffer and loss
        return self.rank, step

    def read(self, token: tuple[int, int]) -> tuple[np.ndarray, float]:
        """A peer's gradient of a step, and the local loss published with it."""
        rank, step = token
        grads, control = self.peers[rank]
        self._wait(rank, lambda: control[PUBLISHED] >= step, f"to publish step {step}")
        return grads[step % 2], float(control[LOSS:].view(np.float64)[step % 2])

    def applied(self, step: int) -> None:
        self.control[APPLIED] = step

    def fail(self) -> None:
        """Tell the peers this replica failed, so none of them waits for it."""
        self.control[FAILED] = 1

    def abandon(self, rank: int) -> None:
        """Stop waiting for the peer at `rank` (called from another thread while this one may wait)."""
        self.abandoned.add(rank)

    def _wait(self, rank: int, ready, what: str) -> None:
        if ready():
            return
        control = self.peers[rank][1]
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


def shared_memory_available() -> bool:
    """True where replicas on one node can use SharedMemoryWire (see its note on x86)."""
    return platform.machine() in ("x86_64", "AMD64") and SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)
