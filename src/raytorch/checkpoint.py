"""Checkpoints in a run directory: written atomically, checked by a checksum, the newest K kept.

    <run dir>/checkpoints/step-000000412.pt          torch.save of a dict (load with weights_only=True)
    <run dir>/checkpoints/step-000000412.pt.sha256   its SHA-256: a checkpoint without one is unfinished

Each file is written to a temporary name, flushed to disk (fsync), then renamed into place, so a
crash leaves either the old set or the new file, never half of one. Pure file logic: no Ray.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

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
