"""Checkpoints in a run directory: written atomically, checked by a checksum, the newest K kept.

    <run dir>/checkpoints/step-000000412.pt          torch.save of a dict (load with weights_only=True)
    <run dir>/checkpoints/step-000000412.pt.sha256   its SHA-256: a checkpoint without one is unfinished

The run directory is a local path or an fsspec URL (storage.py). Locally, each file is written to a
temporary name, flushed to disk (fsync), then renamed into place, so a crash leaves either the old
set or the new file, never half of one. An object store has no atomic rename: the checkpoint goes to
a temporary name, is read back and its SHA-256 checked, then moved to its name; the checksum file,
written last, publishes it, as locally. RunCheckpoints saves where a run stands and resumes from it.
Pure file logic: no Ray.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config.recipes import RECIPES
from ..config.schema import RUN_DEFINING, TrainConfig
from ..core.position import Position
from ..core.snapshot import Snapshot
from ..errors import CheckpointError
from .storage import CHECKPOINTS, check_url, filesystem, is_local, is_url, join

FORMAT = "raytorch-checkpoint/1"
FILE_MODE = 0o666  # as open() creates files: the umask decides, as for the run directory's other files
NAME = re.compile(r"^step-(\d{9})\.pt$")


def directory(run_dir: str | Path) -> str | Path:
    """A run directory's checkpoint folder: a Path, or a URL for a run directory given as one."""
    return join(run_dir, CHECKPOINTS)


def save(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int, own: Optional[list[str]] = None
         ) -> str | Path:
    """Write the checkpoint of global step `step`; then remove all but the newest `keep` of the
    run's own (`own`, oldest first: the names of the checkpoints this run resumed from or wrote;
    None: every checkpoint in the folder)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "step": step, **payload}, buffer)
    data = buffer.getvalue()
    checksum = (hashlib.sha256(data).hexdigest() + "\n").encode()
    name = f"step-{step:09d}.pt"
    fs, folder = filesystem(directory(run_dir))
    if is_local(fs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        _write_atomically(Path(folder) / name, data)
        _write_atomically(Path(folder) / checksum_name(name), checksum)
        _sync_directory(Path(folder))
    else:
        _publish(fs, f"{folder}/{name}", data, checksum)
    mine = set(_names(fs, folder)) if own is None else {*own, name}
    for old in sorted(mine, reverse=True)[keep:]:
        _remove(fs, f"{folder}/{checksum_name(old)}")  # first: the pair reads as unfinished from now on
        _remove(fs, f"{folder}/{old}")
    return join(run_dir, CHECKPOINTS, name)


def listed(run_dir: str | Path) -> list[str | Path]:
    """The checkpoint files of a run directory, newest (highest step) first."""
    return [join(run_dir, CHECKPOINTS, name) for name in _names(*filesystem(directory(run_dir)))]


def load(path: str | Path) -> dict[str, Any]:
    """Read one checkpoint, verifying its checksum and format; CheckpointError says what is wrong."""
    fs, where = filesystem(path)
    try:
        expected = fs.cat_file(checksum_name(where)).decode(errors="replace").strip()
    except OSError as e:
        raise CheckpointError(f"{path}: no checksum file beside it (an unfinished write)") from e
    try:
        data = fs.cat_file(where)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from e
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


def load_latest(run_dir: str | Path) -> tuple[dict[str, Any], str | Path, list[str]]:
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
    and the run resumed from the newest valid one. `mirror` uploads the run directory's other files
    (a remote run directory's, see storage.RunStorage), called after each checkpoint is recorded."""

    def __init__(self, run_dir: Optional[str | Path], config: TrainConfig, say: Callable[[str], None],
                 mirror: Callable[[], None] = lambda: None):
        self.run_dir = (run_dir if is_url(run_dir) else Path(run_dir)) if run_dir else None
        self.config, self.say, self.mirror = config, say, mirror
        self.last: Optional[str | Path] = None  # the newest checkpoint written or resumed from
        self.finished = False  # the run resumed from had finished: nothing left to train
        self.own: list[str] = []  # checkpoints of this run (resumed from, or written): the only ones pruned

    @property
    def enabled(self) -> bool:
        return self.run_dir is not None

    def save(self, snapshot: Snapshot, at: Position, first_step: int) -> str | Path:
        """Write where the run stands: `snapshot` of the replicas' state and `at`, in the epoch that
        starts at global step `first_step`."""
        payload = {**snapshot.state(), **at.checkpoint(snapshot.steps - first_step), "config": self.config.to_dict()}
        try:
            self.last = save(self.run_dir, snapshot.steps, payload, self.config.keep_checkpoints, self.own)
        except OSError as e:  # a full disk, a lost mount, no permission: the temporary file is gone already
            raise CheckpointError(f"could not write the checkpoint of step {snapshot.steps} to "
                                  f"{directory(self.run_dir)} ({e.strerror or e}); {self.kept()}") from e
        except CheckpointError as e:  # an object store's read-back differed
            raise CheckpointError(f"{e}; {self.kept()}") from e
        # what pruning left of the run's own (names sort by step): pruned ones are not asked about again
        self.own = sorted({*self.own, Path(str(self.last)).name})[-self.config.keep_checkpoints:]
        return self.last

    def resume(self, run_dir: str | Path) -> tuple[Snapshot, Position]:
        """The newest valid checkpoint of `run_dir`, as the replicas' state and the run's position;
        a CheckpointError where it was trained with other run-defining fields."""
        check_url(run_dir, "resume_from")
        saved, self.last, skipped = load_latest(run_dir)
        # this run's own: the checkpoint it resumes from and the older ones; not the newer ones skipped
        self.own = [Path(str(path)).name for path in reversed(listed(run_dir)) if str(path) <= str(self.last)]
        for line in skipped:
            self.say(f"skipping a checkpoint: {line}")
        theirs = saved["config"]
        if theirs.get("model") is None and theirs.get("dataset") in RECIPES:  # written before recipes named it
            theirs = {**theirs, "model": RECIPES[theirs["dataset"]]["model"] if self.config.model else None}
        for name in RUN_DEFINING:
            if theirs.get(name) != getattr(self.config, name):
                raise CheckpointError(f"{run_dir} was trained with {name}={theirs.get(name)!r}, this run "
                                      f"asks for {getattr(self.config, name)!r}: resume with the same {name}")
        if saved["epoch"] >= self.config.epochs and saved["index"] == 0:
            self.finished = True
            self.say(f"{run_dir}: the run already finished (step {saved['step']}); nothing to resume")
        return Snapshot.from_checkpoint(saved), Position.from_checkpoint(saved)

    def kept(self) -> str:
        """Where a run that stops now can resume from, in words."""
        if self.last:
            return f"last good checkpoint {self.last}: resume with --resume {self.run_dir}"
        return "no checkpoint written yet" if self.enabled else "no checkpoint written (set output_dir)"


def checksum_name(path: str) -> str:
    return path + ".sha256"


def _names(fs: Any, folder: str) -> list[str]:
    """The checkpoint names in `folder`, newest first; none where it does not exist."""
    fs.invalidate_cache(folder)  # an object store's listing may be cached: read it afresh
    try:
        paths = fs.ls(folder, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted((name for name in (p.rstrip("/").rsplit("/", 1)[-1] for p in paths) if NAME.match(name)),
                  reverse=True)


def _remove(fs: Any, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def _publish(fs: Any, path: str, data: bytes, checksum: bytes) -> None:
    """A checkpoint on a filesystem without an atomic rename (an object store): written to a temporary
    name, read back and checked, moved to its name; then its checksum file, which marks it finished."""
    folder, name = path.rsplit("/", 1)
    temp = f"{folder}/.{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    fs.pipe_file(temp, data)
    try:
        back = fs.cat_file(temp)
        if hashlib.sha256(back).hexdigest() != checksum.decode().strip():
            raise CheckpointError(f"{fs.unstrip_protocol(path)}: read back {len(back)} bytes that differ from the "
                                  f"{len(data)} written; nothing published (the previous checkpoints stand)")
    except BaseException:
        _remove(fs, temp)
        raise
    _remove(fs, checksum_name(path))  # a checkpoint of the same step written before: unfinished from now on
    fs.mv(temp, path)
    fs.pipe_file(checksum_name(path), checksum)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name (created anew, no link followed), flush to disk, rename into place;
    on any failure the temporary file is removed."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _sync_directory(folder: Path) -> None:
    """Make the renames themselves durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
