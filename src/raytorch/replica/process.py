"""The replica's process: setting it up for PyTorch (freed memory kept, torch's threads), its
measured memory, the GPUs Ray assigned it, and lines for its actor log."""

from __future__ import annotations

import ctypes
import sys
from typing import NamedTuple

import ray
import torch

from .device import torch_threads


def proportional_set_size() -> int:
    """This process's memory in bytes, shared pages split among the processes that map them (Linux PSS)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM: the peak RSS), in bytes."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return 0


class Baseline(NamedTuple):
    """This process's memory before any model: what a replica's figures are measured above."""

    pss: int
    rss: int


def peak_bytes(device: torch.device) -> int:
    """This replica's peak memory so far: allocated on its GPU, else its process's peak RSS."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_bytes("VmHWM")


def measured_memory(baseline: Baseline, device: torch.device) -> dict[str, int]:
    """This replica's measured memory: PSS above its baseline now, its peak RSS and that peak
    above the baseline's RSS (an idle replica's), and on a GPU the peak of its allocated memory."""
    peak = status_bytes("VmHWM")
    gpu = {"peak_gpu": torch.cuda.max_memory_allocated(device)} if device.type == "cuda" else {}
    return {"pss_above_baseline": proportional_set_size() - baseline.pss, "peak_rss": peak,
            "peak_above_baseline": peak - baseline.rss, **gpu}


def assigned_gpus() -> list[str]:
    """Ids of the GPUs Ray assigned this process (none outside Ray)."""
    return ray.get_runtime_context().get_accelerator_ids().get("GPU", []) if ray.is_initialized() else []


def keep_freed_memory() -> None:
    """Have glibc keep large freed blocks for reuse instead of returning them to the kernel.

    Every step allocates and frees gradient-sized tensors (backward's fresh gradients); by default
    glibc maps each one anew and unmaps it when freed, so each step pays a page fault per 4 KiB of
    gradient: half of backward's time for a 67 MB gradient here (a 4096 x 4096 linear layer,
    batch 1: 46 ms a step, 17 ms with this). Peak memory is unchanged: the blocks are reused.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    mmap_threshold, trim_threshold = -3, -1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)
    libc.mallopt(mmap_threshold, ctypes.c_int(2**30))
    libc.mallopt(trim_threshold, ctypes.c_int(2**31 - 1))


def prepare_process(cpus_per_replica: float) -> Baseline:
    """Set this process up for a replica (PyTorch's optimizer modules loaded, freed memory kept,
    torch's threads); returns its memory then: the baseline before any model."""
    import torch._dynamo  # noqa: F401  (any torch.optim optimizer imports it: ~70 MB of PyTorch's own)

    keep_freed_memory()
    baseline = Baseline(proportional_set_size(), status_bytes("VmRSS"))  # PyTorch loaded, no model yet
    torch.set_num_threads(torch_threads(cpus_per_replica))
    return baseline


def to_actor_log(line: str) -> None:
    """A line for this actor's log, on stderr (the tab the dashboard's actor page opens on); '': none."""
    if line:
        print(line, file=sys.stderr, flush=True)
