"""A run directory at a URL (storage.py, checkpoint.py): checkpoints written, verified, then published
there, the newest K kept, resumed from; the run's other files staged locally and mirrored.

Without Ray: fsspec's in-process memory:// filesystem and file:// URLs. With Ray: a short run on an
S3-protocol server on 127.0.0.1 (moto, an S3-protocol mock server from PyPI; not real S3), resumed
from the bucket, compared with plain PyTorch.
"""

import hashlib
import io
import logging
import os
import re
import stat
import tempfile
import uuid
from functools import partial
from pathlib import Path

import fsspec
import pytest
import torch
import torch.nn.functional as F
from fsspec.implementations.memory import MemoryFileSystem

from raytorch import CheckpointError, ConfigError, TrainConfig, Trainer
from raytorch.driver.preflight import preflight
from raytorch.errors import RaytorchError
from raytorch.persist.checkpoint import listed, load, load_latest, save
from raytorch.persist.storage import RunStorage
from raytorch.tasks.builtin import linear_data
from reference import assert_same_parameters, train_reference


def payload(value):
    return {"model": {"weight": torch.full((2, 2), float(value))}, "epoch": value}


@pytest.fixture
def memory_url():
    """A run directory of its own on fsspec's memory filesystem (one store per process)."""
    root = f"/raytorch-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}/run"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def names(url):
    fs, path = fsspec.core.url_to_fs(url)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


# -- checkpoints on a filesystem without rename: memory:// ------------------------------------------


def test_checkpoints_at_a_url_are_published_pruned_and_resumed(memory_url):
    for step in (5, 10, 15, 20):
        written = save(memory_url, step, payload(step), keep=2)
        assert written == f"{memory_url}/checkpoints/step-{step:09d}.pt"
    assert listed(memory_url) == [f"{memory_url}/checkpoints/step-000000020.pt",
                                  f"{memory_url}/checkpoints/step-000000015.pt"]
    # the pair of each kept checkpoint, nothing else: no temporary names, the pruned ones gone
    assert names(f"{memory_url}/checkpoints") == ["step-000000015.pt", "step-000000015.pt.sha256",
                                                  "step-000000020.pt", "step-000000020.pt.sha256"]
    saved, path, skipped = load_latest(memory_url)
    assert (saved["step"], saved["epoch"], path, skipped) == (20, 20, listed(memory_url)[0], [])
    assert torch.equal(saved["model"]["weight"], torch.full((2, 2), 20.0))
    with fsspec.open(path, "rb") as f:  # a plain torch.load reads it too (weights only)
        assert torch.load(io.BytesIO(f.read()), weights_only=True)["step"] == 20


@pytest.mark.parametrize("damage, reason", [
    (lambda fs, p: fs.pipe_file(p, fs.cat_file(p)[:-1] + b"x"), "checksum mismatch"),  # bytes changed after publish
    (lambda fs, p: fs.pipe_file(p, fs.cat_file(p)[:50]), "checksum mismatch"),
    (lambda fs, p: fs.rm_file(p + ".sha256"), "no checksum file beside it (an unfinished write)"),
])
def test_a_damaged_or_unfinished_remote_checkpoint_is_skipped_on_resume(memory_url, damage, reason):
    save(memory_url, 1, payload(1), keep=3)
    newest = save(memory_url, 2, payload(2), keep=3)
    fs, path = fsspec.core.url_to_fs(newest)
    damage(fs, path)
    saved, used, skipped = load_latest(memory_url)
    assert saved["step"] == 1 and used.endswith("step-000000001.pt")
    assert len(skipped) == 1 and "step-000000002.pt" in skipped[0] and reason in skipped[0]


class Recording(MemoryFileSystem):
    """The memory filesystem, noting each write, move and removal; `corrupt` changes what reading a
    temporary file gives back (an upload that went wrong)."""

    protocol = "recording"
    calls: list = []
    corrupt = False

    def pipe_file(self, path, value, **kwargs):
        self.calls.append(("write", path.rsplit("/", 1)[-1]))
        return super().pipe_file(path, value, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start, end, **kwargs)
        return data[:-1] + b"?" if self.corrupt and path.endswith(".tmp") else data

    def mv(self, path1, path2, **kwargs):
        self.calls.append(("move", path1.rsplit("/", 1)[-1].split(".")[1], path2.rsplit("/", 1)[-1]))
        return super().mv(path1, path2, **kwargs)

    def rm_file(self, path):
        self.calls.append(("remove", path.rsplit("/", 1)[-1]))
        return super().rm_file(path)


@pytest.fixture
def recording():
    fsspec.register_implementation("recording", Recording, clobber=True)
    Recording.calls, Recording.corrupt = [], False
    root = f"/raytorch-test-{uuid.uuid4().hex[:8]}"
    yield f"recording://{root}/run"
    fs = Recording()
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_publishing_order_the_checksum_last_and_removed_first(recording):
    save(recording, 1, payload(1), keep=1)
    Recording.calls.clear()
    save(recording, 2, payload(2), keep=1)
    writes = [c for c in Recording.calls if c[0] != "remove" or not c[1].endswith(".tmp")]
    assert writes[0][0] == "write" and writes[0][1].startswith(".step-000000002.pt.")  # a temporary name
    assert writes[1:] == [
        ("remove", "step-000000002.pt.sha256"),  # (none yet: a same-step rewrite unpublishes the old first)
        ("move", "step-000000002", "step-000000002.pt"),  # read back and checked before this
        ("write", "step-000000002.pt.sha256"),  # last: it marks the checkpoint finished
        ("remove", "step-000000001.pt.sha256"),  # pruning: unfinished from here on
        ("remove", "step-000000001.pt")]


def test_an_upload_that_reads_back_wrong_is_not_published(recording):
    save(recording, 1, payload(1), keep=3)
    Recording.corrupt = True
    with pytest.raises(CheckpointError, match=r"step-000000002.pt: read back \d+ bytes that differ .* nothing "
                                              r"published"):
        save(recording, 2, payload(2), keep=3)
    assert names(f"{recording}/checkpoints") == ["step-000000001.pt", "step-000000001.pt.sha256"]
    Recording.corrupt = False
    assert load_latest(recording)[0]["step"] == 1


# -- file:// URLs: the local filesystem, atomic as a plain path ------------------------------------


def test_a_file_url_is_a_local_run_directory(tmp_path):
    url = f"file://{tmp_path}/run"
    for step in (3, 6, 9):
        save(url, step, payload(step), keep=2)
    assert listed(url) == [f"{url}/checkpoints/step-000000009.pt", f"{url}/checkpoints/step-000000006.pt"]
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000000006.pt", "step-000000006.pt.sha256",
                                                        "step-000000009.pt", "step-000000009.pt.sha256"]
    assert torch.load(folder / "step-000000009.pt", weights_only=True)["step"] == 9
    assert load_latest(url)[0]["step"] == 9 and load(folder / "step-000000006.pt")["step"] == 6
    storage = RunStorage(url)
    assert (storage.remote, storage.local) == (False, str(tmp_path / "run"))  # written in place, no staging


def test_a_local_path_stays_as_it_was(tmp_path):
    storage = RunStorage(str(tmp_path / "run"))
    storage.open(print)
    storage.mirror(strict=True)
    assert (storage.remote, storage.local) == (False, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # RunDir makes it, as before
    assert RunStorage(None).local is None


# -- the staging directory of a remote run directory ------------------------------------------------


def test_a_link_planted_where_staging_used_to_go_touches_nothing(memory_url, tmp_path, monkeypatch):
    # Another local user plants links at the staging path older raytorch derived from the URL
    # (<tmp>/raytorch-runs/<sha256(url)[:16]>/<name>), aimed at a victim's directory: the run must
    # neither delete nor write anything there.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    predictable = tmp_path / "raytorch-runs" / hashlib.sha256(memory_url.encode()).hexdigest()[:16]
    predictable.mkdir(parents=True)
    (predictable / memory_url.rsplit("/", 1)[-1]).symlink_to(victim)
    fs, root = fsspec.core.url_to_fs(memory_url)
    fs.pipe_file(f"{root}/metrics.jsonl", b'{"event": "epoch"}\n')
    storage = RunStorage(memory_url)
    storage.open(print)
    (Path(storage.local) / "config.yaml").write_text("workers: 2\n")
    storage.mirror(strict=True)
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert victim.resolve() not in Path(storage.local).resolve().parents and Path(storage.local).resolve() != victim


def test_a_remote_run_directory_is_staged_and_mirrored(memory_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fs, root = fsspec.core.url_to_fs(memory_url)
    fs.pipe_file(f"{root}/metrics.jsonl", b'{"event": "epoch"}\n')  # an earlier run's
    save(memory_url, 1, payload(1), keep=1)
    storage = RunStorage(memory_url)
    storage.open(print)
    staged = storage.local
    # a private directory of this run's: made by mkdtemp, 0700, a name nobody could know ahead
    assert storage.remote and staged.parent.parent == tmp_path and staged.parent.name.startswith("raytorch-run-")
    assert stat.S_IMODE(staged.parent.stat().st_mode) == 0o700 and staged.parent.stat().st_uid == os.getuid()
    assert f"run directory {memory_url}: files staged in {staged}" in capsys.readouterr().out
    # what the URL holds, checkpoints aside: a resumed run appends to its metrics.jsonl
    assert sorted(p.name for p in staged.iterdir()) == ["metrics.jsonl"]
    with open(staged / "metrics.jsonl", "a") as f:
        f.write('{"event": "checkpoint"}\n')
    (staged / "tensorboard").mkdir()
    (staged / "tensorboard" / "events").write_bytes(b"\x00\x01")
    uploads = []
    monkeypatch.setattr(fs, "put_file", lambda local, remote, **kw: uploads.append(remote) or
                        MemoryFileSystem.put_file(fs, local, remote, **kw))
    storage.mirror(strict=True)
    assert sorted(uploads) == [f"{root}/metrics.jsonl", f"{root}/tensorboard/events"]
    assert fs.cat_file(f"{root}/metrics.jsonl") == b'{"event": "epoch"}\n{"event": "checkpoint"}\n'
    uploads.clear()
    storage.mirror(strict=True)  # nothing changed: nothing uploaded
    assert uploads == []
    assert names(f"{memory_url}/checkpoints") == ["step-000000001.pt", "step-000000001.pt.sha256"]


def test_a_failed_upload_is_said_and_raised_at_the_end(memory_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    storage = RunStorage(memory_url)
    storage.open(print)
    (storage.local / "model.pt").write_bytes(b"weights")

    def refuse(*args, **kwargs):
        raise PermissionError("Access Denied")

    monkeypatch.setattr(storage.fs, "put_file", refuse)
    storage.mirror()
    assert f"WARNING: could not upload the run's files to {memory_url} (PermissionError: Access Denied); they are " \
           f"in {storage.local}" in capsys.readouterr().out
    with pytest.raises(RaytorchError, match="could not upload the run's files"):
        storage.mirror(strict=True)


# -- what a user can get wrong: said before anything starts ----------------------------------------


def test_an_unknown_protocol_or_a_missing_backend_is_a_config_error(monkeypatch):
    config = TrainConfig(output_dir="nope://bucket/run")  # the config checks values; the machine, preflight
    with pytest.raises(ConfigError, match=r"^output_dir: unknown storage protocol 'nope' in nope://bucket/run"):
        preflight(config)
    with pytest.raises(ConfigError, match=r"^output_dir: unknown storage protocol 'nope' in nope://bucket/run"):
        Trainer(config, model_fn=partial(torch.nn.Linear, 1, 1), dataset_fn=partial(linear_data, 16, 3),
                loss_fn=F.mse_loss).fit()  # first thing, before storage and Ray
    with pytest.raises(ConfigError, match=r"^resume_from: unknown storage protocol"):
        Trainer(TrainConfig(), model_fn=partial(torch.nn.Linear, 1, 1), dataset_fn=partial(linear_data, 16, 3),
                loss_fn=F.mse_loss, resume_from="nope://bucket/run").fit()

    def missing(protocol):
        raise ImportError(f"Install the backend of {protocol}")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(ConfigError, match=r"s3://bucket/run needs the fsspec backend for s3://: "
                                          r"pip install 'raytorch\[s3\]' \(s3fs\)"):
        preflight(TrainConfig(output_dir="s3://bucket/run"))
    with pytest.raises(ConfigError, match=r"gs://bucket/run needs the fsspec backend for gs://: pip install gcsfs"):
        preflight(TrainConfig(output_dir="gs://bucket/run"))
    preflight(TrainConfig(output_dir="runs/local"))  # a path asks nothing of fsspec


# -- S3 protocol: moto's server on 127.0.0.1 -------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's standalone S3 server (an S3-protocol mock from PyPI) on 127.0.0.1, for this module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # its clients point at this server


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    """A new bucket; fake credentials and the endpoint in the environment, as a user sets them; the
    staging directories in the test's own temporary directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    import boto3

    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    name = f"raytorch-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.mark.system
def test_a_bucket_that_does_not_exist_is_said_before_the_run(bucket):
    with pytest.raises(ConfigError, match=r"^output_dir: cannot write to s3://no-such-bucket/run \(.*\); check "
                                          r"that the bucket exists and the credentials"):
        RunStorage("s3://no-such-bucket/run").open(print)


JOB = dict(epochs=2, batch_size=16, lr=1e-4, optimizer="sgd", seed=3)  # 30 steps per epoch
DATA = partial(linear_data, 480, 3)


@pytest.mark.system
def test_a_run_on_s3_checkpoints_there_and_resumes_from_it(ray_local, bucket, capsys):
    url = f"s3://{bucket}/run"
    config = TrainConfig(**JOB, workers=2, output_dir=url, checkpoint_every=10, keep_checkpoints=100)
    run = partial(Trainer, config, model_fn=partial(torch.nn.Linear, 1, 1), dataset_fn=DATA, loss_fn=F.mse_loss)
    full = run().fit()
    staged = rf"{re.escape(tempfile.gettempdir())}/raytorch-run-\w+/run"  # mkdtemp's: a new name each run
    assert re.search(rf"run directory {re.escape(url)}: files staged in {staged}, uploaded", capsys.readouterr().out)
    model, losses = train_reference(partial(torch.nn.Linear, 1, 1), DATA(), F.mse_loss, **JOB)
    assert_same_parameters(full.model, model)
    assert full.epoch_losses == pytest.approx(losses, rel=1e-5)
    # the bucket: every checkpoint with its valid checksum, and the run's files
    fs, root = fsspec.core.url_to_fs(url)
    checkpoints = listed(url)
    assert [int(p[-12:-3]) for p in checkpoints] == [60, 50, 40, 30, 20, 10]
    for path in checkpoints:
        data = fs.cat_file(path.removeprefix("s3://"))
        assert fs.cat_file(path.removeprefix("s3://") + ".sha256").decode().strip() == hashlib.sha256(data).hexdigest()
        assert torch.load(io.BytesIO(data), weights_only=True)["format"] == "raytorch-checkpoint/1"
    held = {p.removeprefix(root + "/") for p in fs.find(root)}
    assert {"config.yaml", "metrics.jsonl", "model.pt"} <= held and not [p for p in held if ".tmp" in p]
    assert f"output_dir: {url}" in fs.cat_file(f"{root}/config.yaml").decode()
    records = fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines()
    assert sum('"event": "checkpoint"' in line for line in records) == 6
    assert sum('"event": "epoch"' in line for line in records) == 2
    # The run "stopped" after step 55: the checkpoint of step 60 never written, that of 50 corrupted in the bucket.
    fs.rm_file(f"{root}/checkpoints/step-000000060.pt")
    fs.pipe_file(f"{root}/checkpoints/step-000000050.pt", fs.cat_file(f"{root}/checkpoints/step-000000050.pt")[:-9])
    resumed = run(resume_from=url).fit()
    out = capsys.readouterr().out
    assert "skipping a checkpoint: " in out and "step-000000050.pt: checksum mismatch" in out
    assert f"resumed from {url}/checkpoints/step-000000040.pt: epoch 1, step 40" in out
    assert resumed.resumed_from == 40
    assert_same_parameters(resumed.model, full.model)
    assert resumed.epoch_losses == pytest.approx(full.epoch_losses, rel=1e-6)
    assert [int(p[-12:-3]) for p in listed(url)][:2] == [60, 50] and load(listed(url)[0])["step"] == 60
    # metrics.jsonl goes on: the first run's records, then the resumed run's
    records = fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines()
    assert sum('"event": "epoch"' in line for line in records) == 3  # epochs 0, 1, and 1 again
