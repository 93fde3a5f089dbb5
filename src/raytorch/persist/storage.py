"""Where a run directory lives: a local path, written in place, or an fsspec URL (s3://bucket/run,
gs://bucket/run, file:///abs/path).

A URL on a remote filesystem gets a local staging directory for the files the run writes as it
goes (config.yaml, metrics.jsonl, tensorboard/, loss.png, model.pt, ...),

    <tempfile.gettempdir()>/raytorch-run-<random>/<the URL's last name>

(made by mkdtemp: mode 0700 and a name nobody can plant a link at ahead of the run), which starts
as a copy of what the URL holds (a resumed run appends to its metrics.jsonl, as in a local
directory) and is uploaded to the URL (mirrored) at each checkpoint, at the end of the run and when
it stops on an error or a signal. Checkpoints go straight to the URL (checkpoint.py). A file://
URL is a local path: no staging.

Credentials are the backend's own. s3:// (s3fs, botocore): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
(AWS_SESSION_TOKEN) or AWS_PROFILE, AWS_DEFAULT_REGION. An S3-compatible server (MinIO, moto, ...):
its endpoint from AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3, or fsspec's FSSPEC_S3_ENDPOINT_URL; see
ENDPOINT_VARIABLES).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from ..errors import ConfigError, RaytorchError

# What to install for a protocol whose fsspec backend is missing (fsspec's own hint for the others).
INSTALL = {"s3": "pip install 'raytorch[s3]' (s3fs)", "s3a": "pip install 'raytorch[s3]' (s3fs)",
           "gs": "pip install gcsfs", "gcs": "pip install gcsfs",
           "az": "pip install adlfs", "abfs": "pip install adlfs", "abfss": "pip install adlfs"}
CHECKPOINTS = "checkpoints"  # the run directory's folder that checkpoint.py writes on the URL itself
PROBE = ".raytorch-write-check"
# An S3-compatible server's endpoint, the first set of: fsspec's variable, then the AWS CLI's and
# botocore's (the service-specific one first). Passed explicitly: the botocore that an older s3fs
# brings does not read AWS_ENDPOINT_URL itself, and fsspec reads its own only when imported.
ENDPOINT_VARIABLES = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_url(address: str | Path) -> bool:
    """True for 'protocol://...' (a pathlib.Path never is one)."""
    return "://" in str(address)


def join(run_dir: str | Path, *parts: str) -> str | Path:
    """A path inside a run directory, in the form the run directory was given: a Path, or a URL."""
    if not is_url(run_dir):
        return Path(run_dir).joinpath(*parts)
    return "/".join([str(run_dir).rstrip("/"), *parts])


def filesystem(address: str | Path) -> tuple[Any, str]:
    """The fsspec filesystem of a local path or a URL, and the path on it. An s3:// URL's endpoint
    comes from ENDPOINT_VARIABLES where one is set (read now, handed to s3fs as endpoint_url)."""
    options = {}
    if split_protocol(str(address))[0] in ("s3", "s3a"):
        endpoint = next((os.environ[name] for name in ENDPOINT_VARIABLES if os.environ.get(name)), None)
        options = {"endpoint_url": endpoint} if endpoint else {}
    return url_to_fs(str(address), **options)


def is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


def check_url(address: Optional[str | Path], field: str) -> None:
    """A ConfigError for `field` unless `address` is a local path, or a URL whose protocol fsspec
    knows and whose backend is installed."""
    if not address or not is_url(address):
        return
    for part in str(address).split("::"):  # fsspec's chained URLs: simplecache::s3://...
        protocol = split_protocol(part)[0] or "file"
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise ConfigError(field, f"unknown storage protocol {protocol!r} in {address}: give a local path or "
                                     f"an fsspec URL (s3://bucket/path, gs://bucket/path, file:///abs/path)") from None
        except ImportError as e:
            install = INSTALL.get(protocol, str(e))
            raise ConfigError(field, f"{address} needs the fsspec backend for {protocol}://: {install}") from None


def staging_dir(url: str) -> Path:
    """A new local directory where a remote run directory's files are written before their upload,
    inside a private one of this user's (tempfile.mkdtemp: 0700, an unpredictable name)."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "run"
    return Path(tempfile.mkdtemp(prefix="raytorch-run-")) / name


class RunStorage:
    """A run directory: `local` is where the run writes its files; for a remote URL, a staging
    directory mirrored to it. No run directory where `url` is None."""

    def __init__(self, url: Optional[str | Path], field: str = "output_dir"):
        check_url(url, field)
        self.url, self.field = url, field
        self.fs, root = filesystem(url) if url else (None, "")
        self.root = root.rstrip("/")
        self.remote = self.fs is not None and not is_local(self.fs)
        self.local: Optional[str | Path] = (staging_dir(str(url)) if self.remote
                                            else self.root if url and is_url(url) else url)
        self.say: Callable[[str], None] = lambda line: None
        self.uploaded: dict[str, tuple[int, int]] = {}  # staged file -> (size, mtime) when last uploaded

    def open(self, say: Callable[[str], None]) -> None:
        """A remote run directory: check that the URL can be written (a ConfigError if not), then
        fill an empty staging directory with what the URL holds, checkpoints aside."""
        self.say = say
        if not self.remote:
            return
        staged = Path(self.local)
        try:
            held = [path for path in self.fs.find(self.root) if self._kept(self._relative(path))]
            probe = f"{self.root}/{PROBE}-{os.getpid()}"
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
            for path in held:
                target = staged / self._relative(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(target))
                self.uploaded[self._relative(path)] = _stamp(target)
        except Exception as e:  # each backend raises its own: no bucket, no credentials, no route
            raise ConfigError(self.field, f"cannot write to {self.url} ({type(e).__name__}: {e}); check that the "
                                          f"bucket exists and the credentials (for s3://: AWS_ACCESS_KEY_ID and "
                                          f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE; AWS_ENDPOINT_URL for an "
                                          f"S3-compatible server)") from e
        staged.mkdir(parents=True, exist_ok=True)
        say(f"run directory {self.url}: files staged in {staged}, uploaded at each checkpoint and at the end; "
            f"checkpoints written to it directly")

    def mirror(self, strict: bool = False) -> None:
        """Upload the staged files changed since their last upload (nothing for a local run directory).
        A failed upload is said (and tried again by the next mirror); with `strict`, a RaytorchError."""
        if not self.remote:
            return
        try:
            for path in sorted(p for p in Path(self.local).rglob("*") if p.is_file()):
                relative, stamp = path.relative_to(self.local).as_posix(), _stamp(path)
                if self._kept(relative) and self.uploaded.get(relative) != stamp:
                    self.fs.put_file(str(path), f"{self.root}/{relative}")
                    self.uploaded[relative] = stamp
        except Exception as e:  # the backend's network and permission errors alike
            message = (f"could not upload the run's files to {self.url} ({type(e).__name__}: {e}); "
                       f"they are in {self.local}")
            if strict:
                raise RaytorchError(message) from e
            self.say(f"WARNING: {message}")

    def names(self) -> list[str]:
        """What the run directory holds at its top: names of files and folders (none where it does
        not exist yet)."""
        if not self.remote:
            return sorted(p.name for p in Path(self.root).iterdir()) if Path(self.root).is_dir() else []
        self.fs.invalidate_cache(self.root)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def remove(self, names: list[str]) -> None:
        """Remove these files and folders from the top of the run directory (and from the staging
        directory of a remote one)."""
        for name in names:
            if self.remote:
                if self.fs.exists(f"{self.root}/{name}"):
                    self.fs.rm(f"{self.root}/{name}", recursive=True)
                self.uploaded = {k: v for k, v in self.uploaded.items() if k != name and not k.startswith(name + "/")}
            path = Path(self.local if self.remote else self.root) / name  # the staged copy, or the file itself
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def remove_matching(self, folder: str, pattern) -> list[str]:
        """Remove the files of `folder` (in the run directory) whose names match `pattern`; their names."""
        if self.remote:
            where = f"{self.root}/{folder}"
            self.fs.invalidate_cache(where)
            try:
                paths = self.fs.ls(where, detail=False)
            except FileNotFoundError:
                return []
        else:
            where = Path(self.root) / folder
            paths = [str(p) for p in where.iterdir()] if where.is_dir() else []
        removed = []
        for path in paths:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if pattern.match(name):
                (self.fs.rm_file(path) if self.remote else Path(path).unlink())
                removed.append(name)
        return sorted(removed)

    def _relative(self, path: str) -> str:
        return path[len(self.root):].lstrip("/")

    @staticmethod
    def _kept(relative: str) -> bool:
        """A file the staging directory mirrors: not a checkpoint, not a write check."""
        return bool(relative) and not relative.startswith(CHECKPOINTS + "/") and not relative.startswith(PROBE)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
