"""The collective wire: gradients all-reduced by torch.distributed (gloo, or NCCL on GPUs) inside the replicas.

For replicas on several nodes: each replica's gradient comes weighted (n_r / n: backward of its
share of the global mean loss) and the group sums them with a ring all-reduce, in place, in
buckets started while backward still computes the earlier layers (as DDP does), ~2
gradients sent and received per replica and step whatever the number of replicas, instead of
every node fetching every peer's gradient from Ray's object store.
The local loss travels in the same buffer (its last element), so every replica gets the same
global loss, and a non-finite one (NaN stands for a non-finite loss or gradient) makes every
replica skip the same step. The driver hands out the rendezvous (an address and a fresh port for
each membership generation); a replica that fails closes its group, and its peers stop at once.
With NCCL (every replica on a GPU of its own) the buffer is the flat gradient on the device: it
never crosses to the host.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .protocol import PeerFailed

# Gradient elements per bucket: reduced while backward computes the earlier layers' gradients.
# Small enough that a 17 MB gradient makes several buckets, large enough that each operation's
# fixed cost (a few round trips) stays small against its bytes.
BUCKET_ELEMENTS = 1 << 20


def buckets(bounds: Sequence[tuple[int, int]], most: int = BUCKET_ELEMENTS) -> list[tuple[int, int]]:
    """The flat gradient's parameters (`bounds`: each one's [lo, hi) in it) grouped into contiguous
    buckets of about `most` elements, from the last parameter back: backward reaches the last
    layers first, so buckets fill roughly in this order. Every replica computes the same buckets."""
    out: list[tuple[int, int]] = []
    hi = bounds[-1][1] if bounds else 0
    for lo, _ in reversed(bounds):
        if hi - lo >= most or lo == 0:
            out.append((lo, hi))
            hi = lo
    return out


class Buckets:
    """The order the buckets are all-reduced in, one step at a time: bucket b starts once all its
    parameters' gradients are in the buffer and buckets 0..b-1 have started, so every replica
    issues the same operations in the same order (gloo and NCCL match them by order).

    With a `wire_dtype` (bfloat16) a bucket is rounded into a buffer of that dtype, all-reduced
    there, and copied back once it is done: half the bytes on the wire, a sum in that dtype."""

    def __init__(self, bounds: Sequence[tuple[int, int]], buffer: torch.Tensor,
                 wire_dtype: Optional[torch.dtype] = None):
        self.buffer = buffer
        self.wire = None if wire_dtype is None else torch.empty(buffer.numel() - 1, dtype=wire_dtype,
                                                                device=buffer.device)
        self.ranges = buckets(bounds)
        starts = [lo for lo, _ in self.ranges]
        # each parameter's bucket: the one whose range holds its first element
        self.bucket_of = [next(b for b, start in enumerate(starts) if start <= lo) for lo, _ in bounds]
        self.size = [self.bucket_of.count(b) for b in range(len(self.ranges))]
        self.waiting: list[int] = []
        self.started: list = []  # the step's operations in flight

    def begin(self) -> None:
        self.waiting, self.started = list(self.size), []

    def ready(self, index: int) -> None:
        """Parameter `index`'s gradient is in the buffer: start every bucket now complete, in order."""
        self.waiting[self.bucket_of[index]] -= 1
        while len(self.started) < len(self.ranges) and self.waiting[len(self.started)] == 0:
            self._start(*self.ranges[len(self.started)])

    def _start(self, lo: int, hi: int) -> None:
        if self.wire is None:
            self.started.append(dist.all_reduce(self.buffer[lo:hi], async_op=True))
        else:
            self.started.append(dist.all_reduce(self.wire[lo:hi].copy_(self.buffer[lo:hi]), async_op=True))

    def finish(self) -> None:
        """Start what has not started (all of it on a replica with no sample, or one whose gradient
        was copied in whole), then the loss in the buffer's last element (in the buffer's dtype
        always), and wait for all."""
        for lo, hi in self.ranges[len(self.started):]:
            self._start(lo, hi)
        self.started.append(dist.all_reduce(self.buffer[-1:], async_op=True))
        for work in self.started:
            work.wait()
        self.started = []
        if self.wire is not None:
            self.buffer[:-1].copy_(self.wire)


def free_port(host: str) -> int:
    """A port free on this node now, for the group's rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class CollectiveWire:
    """The replica at `position` of a group of `world` (gloo or NCCL), over a buffer holding the
    gradient and the loss."""

    kind = "collective"
    waited = 0.0  # the all-reduce waits inside gloo: counted as the replica's own (fixed) work

    def __init__(self, position: int, world: int, address: str, port: int, timeout_s: float, buffer: torch.Tensor,
                 bounds: Sequence[tuple[int, int]], backend: str = "gloo", wire_dtype: Optional[torch.dtype] = None,
                 joined: bool = False):
        """`buffer`: the replica's gradient and one element more (its host buffer), `bounds`
        each parameter's place in it. On a CPU replica, or with NCCL, it is the gradient itself:
        all-reduced in place, bucket by bucket as backward fills it (`ready`); `wire_dtype`: see
        Buckets; `joined`: the group is joined already (join)."""
        if not joined:
            join(position, world, address, port, timeout_s, backend, buffer.device)
        self.position, self.buffer, self.backend = position, buffer, backend
        self.buckets = Buckets(bounds, buffer, wire_dtype)
        self.ready = self.buckets.ready
        self.buffer_bytes = 0  # the replica's own buffer
        self.loss = 0.0

    def target(self, step: int) -> None:
        """A step's gradient begins: its buckets start as they fill. The buffer is the replica's own."""
        self.buckets.begin()

    def publish(self, flat: torch.Tensor, step: int, loss: float) -> tuple[int, int]:
        if flat.data_ptr() != self.buffer.data_ptr():  # a GPU replica's staging buffer: reduced whole
            self.buffer[:-1].copy_(flat)
        self.loss = loss
        return self.position, step

    def all_reduce(self, items: Sequence[tuple[int, int]], grad_weights: Sequence[float],
                   loss_weights: Sequence[float], out: torch.Tensor) -> float:
        """out = the sum over replicas of their gradients, weighted in the replicas' backward;
        returns the sum of loss_weight * local loss. A replica with no sample in the step (not among
        the tokens `items`) adds zeros."""
        mine = [i for i, (position, _) in enumerate(items) if position == self.position]
        if mine:
            self.buffer[-1] = loss_weights[mine[0]] * self.loss
        else:
            self.buffer.zero_()
            self.buckets.begin()
        try:
            self.buckets.finish()
        except RuntimeError as e:  # gloo's word for a peer that closed its group, died or timed out
            raise PeerFailed(f"the all-reduce with the other replicas failed: {str(e).splitlines()[0]}") from e
        if out.data_ptr() != self.buffer.data_ptr():
            out.copy_(self.buffer[:-1])
        return float(self.buffer[-1])

    def applied(self, step: int) -> None:
        pass

    def fail(self) -> None:
        """Close the group: peers waiting in the all-reduce get an error at once."""
        close()

    def abandon(self, rank: int) -> None:
        """The driver declared a peer dead. gloo fails by itself once the driver kills it (its
        connections close); NCCL would wait out its timeout, so the group is aborted here (from the
        health thread, while the step thread may wait in the all-reduce)."""
        if self.backend == "nccl" and dist.is_initialized():
            dist.distributed_c10d._abort_process_group()


def join(position: int, world: int, address: str, port: int, timeout_s: float, backend: str,
         device: torch.device) -> None:
    """Join a (fresh) process group of `world` at `position`, meeting at address:port; the previous
    generation's group, if any, is closed first."""
    close()
    if backend == "nccl":
        torch.cuda.set_device(device)
    on = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=position, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **on)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
