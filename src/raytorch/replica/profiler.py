"""Profiling a run's steps (profile_steps A:B): each replica times the phases of every step, and
over global steps A .. B-1 records a torch.profiler trace with the phases marked
(raytorch.fetch, raytorch.forward_backward, raytorch.allreduce, raytorch.optimizer). At the end
the driver writes each replica's trace to <output_dir>/profile/replica-<rank>.json (Chrome trace
JSON: Perfetto, chrome://tracing) and says each replica's mean milliseconds per phase.

A step's phases span two replica calls: fetch and forward+backward run when its gradient is
computed, the all-reduce and the optimizer step when the next call (or the epoch's last apply)
applies it. So the trace starts at the first phase of step A and stops after step B-1's optimizer
step, wherever those fall among the calls.
"""

from __future__ import annotations

import gzip
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, record_function

from ..core.naming import replica_name

PHASES = {"fetch": "fetch", "forward_backward": "forward+backward", "allreduce": "all-reduce",
          "optimizer": "optimizer"}
"""Each phase of a step, by the name its trace marker carries (raytorch.<name>), and as the console says it."""


class Phase:
    """One phase of one step, timed as a `with` block (`seconds` once it has ended without an
    error); in a profiled step, counted for the breakdown and marked in the trace. A plain class,
    not a generator: every step of every run goes through four of these."""

    def __init__(self, profiler: "StepProfiler", name: str, step: int):
        self.profiler, self.name, self.step = profiler, name, step
        self.profiled = profiler.first <= step < profiler.end
        self.marker: Optional[record_function] = None  # the trace's mark, while recording
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> "Phase":
        profiler = self.profiler
        if self.profiled and profiler.trace is None:  # the window's first phase starts the trace
            profiler.trace = torch.profiler.profile(activities=profiler.activities, record_shapes=False)
            profiler.trace.start()
            profiler.recording = True
        if profiler.recording:
            self.marker = record_function(f"raytorch.{self.name}")
            self.marker.__enter__()
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.seconds = time.perf_counter() - self.started
        if self.marker is not None:
            self.marker.__exit__(kind, error, traceback)
        if kind is None and self.profiled:
            self.profiler.seconds.setdefault(self.step, dict.fromkeys(PHASES, 0.0))[self.name] += self.seconds


class StepProfiler:
    """One replica's side: times each phase of every step, keeps the seconds of the profiled steps
    [first, end), and records their trace. Without profile_steps it only times."""

    def __init__(self, steps: Optional[tuple[int, int]], device: torch.device):
        self.first, self.end = steps or (0, 0)
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.trace: Optional[torch.profiler.profile] = None  # once started: recording, then stopped
        self.recording = False
        self.seconds: dict[int, dict[str, float]] = {}  # per profiled step, per phase
        if steps is not None:
            # Kineto sets itself up on its first trace, and prints an error unless that is in the
            # thread that loaded PyTorch: here (a replica's constructor), not the thread of its steps.
            warm_up = torch.profiler.profile(activities=self.activities, record_shapes=False)
            warm_up.start()
            warm_up.stop()

    def phase(self, name: str, step: int) -> Phase:
        """Phase `name` of global step `step`, for a `with` block: timed (its `seconds`), and, in a
        profiled step, counted for the breakdown and marked in the trace (which starts with the
        window's first phase)."""
        return Phase(self, name, step)

    def applied(self, step: int) -> None:
        """Step `step`'s update is done: after the window's last, the trace stops."""
        if self.recording and step >= self.end - 1:
            self.trace.stop()
            self.recording = False

    def from_step(self, step: int) -> None:
        """The replica computes step `step` next: any seconds kept of it or later steps are from
        before a loss and restore, and go (those steps are timed again; the trace keeps them)."""
        if self.seconds and max(self.seconds) >= step:
            self.seconds = {done: phases for done, phases in self.seconds.items() if done < step}

    def report(self) -> dict:
        """The profiled steps' seconds per phase, and the trace as gzipped Chrome JSON (None where
        no profiled step ran here). A trace still recording (the run ended in the window) stops."""
        self.applied(self.end)
        if self.trace is None:
            return {"seconds": self.seconds, "trace": None}
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "trace.json"
            self.trace.export_chrome_trace(str(path))
            return {"seconds": self.seconds, "trace": gzip.compress(path.read_bytes())}


def breakdown(seconds: dict[int, dict[str, float]]) -> dict[str, float]:
    """Mean milliseconds per step of each phase over the steps in `seconds` (zeros where none)."""
    return {name: 1000 * sum(s[name] for s in seconds.values()) / max(1, len(seconds)) for name in PHASES}


def profile_line(name: str, profile: dict, window: tuple[int, int]) -> str:
    """The console's line on one replica's profile (see write_profiles)."""
    if not profile["steps"]:
        return (f"profile {name}: none of steps {window[0]}-{window[1] - 1} ran here (the run ended before, "
                f"or this replica took a lost one's place after them)")
    first, last = profile["steps"][0], profile["steps"][-1]
    phases = ", ".join(f"{label} {profile['ms'][phase]:.1f} ms" for phase, label in PHASES.items())
    return (f"profile {name} (steps {first}-{last}): {phases}"
            + (f"; trace {profile['trace']}" if profile["trace"] else "; no trace"))


def write_profiles(run_dir: Optional[str | Path], window: Optional[tuple[int, int]], reports: list[dict],
                   say: Callable[[str], None]) -> dict[str, dict]:
    """Write each replica's trace to run_dir/profile/replica-<rank>.json and say its breakdown.

    Args:
        run_dir: where the run writes its files (a remote output_dir's staging directory, uploaded
            with the rest at the end: storage.py).
        window: the profiled steps [A, B) (profile_steps), None when the run profiled nothing.
        reports: each live replica's Replica.profile(): its rank and StepProfiler.report().

    Returns:
        By replica name: the profiled steps, mean ms per step of each phase ("ms"), the trace's path.
    """
    if window is None:
        return {}
    profiles = {}
    for report in sorted(reports, key=lambda report: report["rank"]):
        name, trace = replica_name(report["rank"]), None
        if report["trace"] is not None:
            trace = Path(run_dir) / "profile" / f"{name}.json"
            trace.parent.mkdir(parents=True, exist_ok=True)
            trace.write_bytes(gzip.decompress(report["trace"]))
        profiles[name] = {"steps": sorted(report["seconds"]), "ms": breakdown(report["seconds"]),
                          "trace": str(trace) if trace else None}
        say(profile_line(name, profiles[name], window))
    return profiles
