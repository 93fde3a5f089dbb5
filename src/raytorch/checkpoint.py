"""Checkpoints in a run directory: written atomically, checked by a checksum, the newest K kept.

    <run dir>/checkpoints/step-000000412.pt          torch.save of a dict (load with weights_only=True)
    <run dir>/checkpoints/step-000000412.pt.sha256   its SHA-256: a checkpoint without one is unfinished

Each file is written to a temporary name, flushed to disk (fsync), then renamed into place, so a
crash leaves either the old set or the new file, never half of one. RunCheckpoints saves where
a run stands and resumes from it. Pure file logic: no Ray.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import RUN_DEFINING, TrainConfig
from .errors import CheckpointError
from .position import Position
from .snapshot import Snapshot

FORMAT = "raytorch-checkpoint/1"
NAME = re.compile(r"^step-(\d{9})\.pt$")


def directory(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of global step `step`; then remove all but the newest `keep`."""
    folder = directory(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "step": step, **payload}, buffer)
    data = buffer.getvalue()
    path = folder / f"step-{step:09d}.pt"
    _write_atomically(path, data)
    _write_atomically(_checksum_path(path), (hashlib.sha256(data).hexdigest() + "\n").encode())
    _sync_directory(folder)
    for old in listed(run_dir)[keep:]:
        _checksum_path(old).unlink(missing_ok=True)  # first: the pair reads as unfinished from now on
        old.unlink(missing_ok=True)
    return path


def listed(run_dir: str | Path) -> list[Path]:
    """The checkpoint files of a run directory, newest (highest step) first."""
    folder = directory(run_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if NAME.match(p.name)), reverse=True)


def load(path: str | Path) -> dict[str, Any]:
    """Read one checkpoint, verifying its checksum and format; CheckpointError says what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from e
    try:
        expected = _checksum_path(path).read_text().strip()
    except OSError as e:
        raise CheckpointError(f"{path}: no checksum file beside it (an unfinished write)") from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(f"{path}: checksum mismatch ({len(data)} bytes; truncated or corrupted)")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors alike for a foreign file
        raise CheckpointError(f"{path}: not a raytorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a raytorch checkpoint (no '{FORMAT}' format marker)")
    return payload


def load_latest(run_dir: str | Path) -> tuple[dict[str, Any], Path, list[str]]:
    """The newest valid checkpoint of a run directory, its path, and a line for each newer one skipped."""
    skipped = []
    for path in listed(run_dir):
        try:
            return load(path), path, skipped
        except CheckpointError as e:
            skipped.append(str(e))
    found = "; ".join(skipped) if skipped else f"no checkpoint in {directory(run_dir)}"
    raise CheckpointError(f"nothing to resume from in {run_dir}: {found}")


class RunCheckpoints:
    """A run directory's checkpoints: a replica's Snapshot and the driver's Position in one file,
    and the run resumed from the newest valid one."""

    def __init__(self, run_dir: Optional[str | Path], config: TrainConfig, say: Callable[[str], None]):
        self.run_dir = Path(run_dir) if run_dir else None
        self.config, self.say = config, say
        self.last: Optional[Path] = None  # the newest checkpoint written or resumed from

    @property
    def enabled(self) -> bool:
        return self.run_dir is not None

    def save(self, snapshot: Snapshot, at: Position, first_step: int) -> Path:
        """Write where the run stands: `snapshot` of the replicas' state and `at`, in the epoch that
        starts at global step `first_step`."""
        payload = {**snapshot.state(), **at.checkpoint(snapshot.steps - first_step), "config": self.config.to_dict()}
        self.last = save(self.run_dir, snapshot.steps, payload, self.config.keep_checkpoints)
        return self.last

    def resume(self, run_dir: str | Path) -> tuple[Snapshot, Position]:
        """The newest valid checkpoint of `run_dir`, as the replicas' state and the run's position;
        a CheckpointError where it was trained with other run-defining fields."""
        saved, self.last, skipped = load_latest(run_dir)
        for line in skipped:
            self.say(f"skipping a checkpoint: {line}")
        theirs = saved["config"]
        for name in RUN_DEFINING:
            if theirs.get(name) != getattr(self.config, name):
                raise CheckpointError(f"{run_dir} was trained with {name}={theirs.get(name)!r}, this run "
                                      f"asks for {getattr(self.config, name)!r}: resume with the same {name}")
        if saved["epoch"] >= self.config.epochs and saved["index"] == 0:
            self.say(f"{run_dir}: the run already finished; nothing to resume")
        return Snapshot.from_checkpoint(saved), Position.from_checkpoint(saved)

    def kept(self) -> str:
        """Where a run that stops now can resume from, in words."""
        if self.last:
            return f"last good checkpoint {self.last}"
        return "no checkpoint written yet" if self.enabled else "no checkpoint written (set output_dir)"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _sync_directory(folder: Path) -> None:
    """Make the renames themselves durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
