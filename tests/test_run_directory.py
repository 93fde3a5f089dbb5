"""A run directory you can trust, without Ray (Trainer.fit on in-process FakeGroups, as in
test_driver_unit.py): a fresh run refuses another run's directory at once, or overwrites it on
request; checkpoints are pruned only among the run's own; a finished run's --resume returns at once;
a resumed run's samples/s counts its own samples; a failed write stops in one line naming the last
good checkpoint and the resume command, leaving no temporary file; interrupted writes' leftovers go
on the next start; the run's files share one mode; a replica's error names where to resume from; a
model_fn that builds differently per process fails at start."""

import errno
import json
import os
import shutil
import stat
from functools import partial

import pytest
import torch

from raytorch import CheckpointError, ConfigError, ReplicaError, TrainConfig, Trainer
from raytorch.output.sink import RunOutput
from raytorch.tasks.builtin import mlp
from test_driver_unit import EVAL, JOB, MLP
from test_driver_unit import runs as runs  # noqa: F401  (the fixture)

pytestmark = pytest.mark.unit


def trainer(resume: bool = False, **settings) -> Trainer:
    return Trainer(TrainConfig(**{**JOB, "workers": 2, **settings}), model_fn=MLP["model_fn"],
                   dataset_fn=MLP["data"], loss_fn=MLP["loss_fn"], eval_dataset_fn=EVAL, quiet=True,
                   resume_from=settings["output_dir"] if resume else None)


def steps_logged(run) -> list[int]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if r["event"] == "step"]


def test_a_fresh_run_into_another_runs_directory_is_refused_at_once(runs, tmp_path):
    run = tmp_path / "run"
    runs.fit(workers=2, output_dir=str(run), log_every=1)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=rf"^output_dir: {run} holds another run's files \(checkpoints, config.yaml, "
                                          rf"loss.png, metrics.jsonl, model.pt, model.safetensors\): continue that run "
                                          rf"with --resume {run} .*, replace it with --overwrite"):
        runs.fit(workers=2, output_dir=str(run), log_every=1)
    assert len(runs.groups) == 1  # refused before any replica started
    assert (run / "metrics.jsonl").read_text() == before


def test_overwrite_replaces_the_runs_files_and_leaves_the_users(runs, tmp_path):
    run = tmp_path / "run"
    runs.fit(workers=2, output_dir=str(run), log_every=1, checkpoint_every=2, keep_checkpoints=100)
    (run / "notes.txt").write_text("mine")
    runs.fit(workers=2, output_dir=str(run), log_every=1, overwrite=True)
    assert steps_logged(run) == list(range(1, 16))  # one run's steps, not two runs' appended
    # the second run's (each epoch's end, the newest 3), none of the first run's every-2-steps ones
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == [f"step-{s:09d}.pt" for s in (5, 10, 15)]
    assert (run / "notes.txt").read_text() == "mine"


def test_resuming_a_finished_run_returns_its_result_at_once(runs, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    first = runs.fit(workers=2, output_dir=str(run))

    def no_ray(*args, **kwargs):
        raise AssertionError("a finished run's resume started Ray")

    monkeypatch.setattr("raytorch.driver.trainer.ray_session", no_ray)
    again = Trainer(TrainConfig(**JOB, workers=2, output_dir=str(run)), model_fn=MLP["model_fn"],
                    dataset_fn=MLP["data"], loss_fn=MLP["loss_fn"], eval_dataset_fn=EVAL, resume_from=str(run)).fit()
    assert f"{run}: the run already finished (step 15); nothing to resume" in capsys.readouterr().out
    assert again.steps == 15 and again.resumed_from == 15 and again.samples == 0
    assert again.epoch_losses == first.epoch_losses and again.eval_losses == first.eval_losses
    for a, b in zip(again.model.parameters(), first.model.parameters()):
        assert a.equal(b)


def test_a_resumed_runs_samples_per_second_counts_its_own_samples(runs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    runs.fit(workers=2, output_dir=str(run), keep_checkpoints=10)
    for step in (10, 15):  # leave epoch 0's checkpoint (step 5): the resumed run trains epochs 1 and 2
        for path in (run / "checkpoints").glob(f"step-{step:09d}.pt*"):
            path.unlink()
    timed = []
    finished = RunOutput.finished
    monkeypatch.setattr(RunOutput, "finished", lambda self, at, steps, samples, *rest: timed.append(samples) or
                        finished(self, at, steps, samples, *rest))
    result = Trainer(TrainConfig(**JOB, workers=2, output_dir=str(run)), model_fn=MLP["model_fn"],
                     dataset_fn=MLP["data"], loss_fn=MLP["loss_fn"], quiet=True, resume_from=str(run)).fit()
    assert result.resumed_from == 5 and result.samples == 3 * 66
    assert timed == [2 * 66]  # the Done line's samples/s: the two epochs this run trained, not three


def test_checkpoints_are_pruned_only_among_the_runs_own(runs, tmp_path, capsys):
    run = tmp_path / "run"
    runs.fit(workers=2, output_dir=str(run), keep_checkpoints=2)  # keeps steps 10 and 15
    for path in (run / "checkpoints").glob("step-000000015.pt*"):
        path.unlink()
    # a checkpoint not of this run's lineage, numbered past it, that does not verify
    (run / "checkpoints" / "step-000000099.pt").write_bytes(b"not a checkpoint")
    (run / "checkpoints" / "step-000000099.pt.sha256").write_text("0" * 64 + "\n")
    result = Trainer(TrainConfig(**JOB, workers=2, output_dir=str(run), keep_checkpoints=2), model_fn=MLP["model_fn"],
                     dataset_fn=MLP["data"], loss_fn=MLP["loss_fn"], resume_from=str(run)).fit()
    assert result.resumed_from == 10
    assert "skipping a checkpoint" in capsys.readouterr().out
    # the run's own newest two stay; the foreign one is left as it was (old raytorch kept 99 and 15 only)
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == [
        "step-000000010.pt", "step-000000015.pt", "step-000000099.pt"]


def test_leftovers_of_interrupted_writes_are_removed_on_the_next_start(runs, tmp_path, capsys):
    run = tmp_path / "run"
    runs.fit(workers=2, output_dir=str(run), max_steps=8, keep_checkpoints=10)
    left = [run / "checkpoints" / ".step-000000010.pt.4242.tmp",  # a local write's
            run / "checkpoints" / ".step-000000010.pt.sha256.4242.tmp",
            run / "checkpoints" / ".step-000000010.pt.4242-0a1b2c3d.tmp"]  # an object store's publish
    for path in left:
        path.write_bytes(b"half")
    (run / "checkpoints" / "keep-me.tmp").write_text("not raytorch's name")
    Trainer(TrainConfig(**JOB, workers=2, output_dir=str(run), max_steps=8), model_fn=MLP["model_fn"],
            dataset_fn=MLP["data"], loss_fn=MLP["loss_fn"], resume_from=str(run)).fit()
    assert not any(path.exists() for path in left) and (run / "checkpoints" / "keep-me.tmp").exists()
    assert "removed 3 temporary file(s) of interrupted checkpoint writes" in capsys.readouterr().out


@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """From the `n`-th fsync on of a file under tmp_path on (set .after), ENOSPC: a disk that fills."""
    real, calls = os.fsync, []

    class Disk:
        after = 0

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)) and not os.path.isdir(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) > Disk.after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return Disk


@pytest.mark.parametrize("written_before", [0, 4], ids=["first", "later"])
def test_a_full_disk_stops_in_one_line_naming_the_last_good_checkpoint(runs, tmp_path, full_disk, written_before):
    # each checkpoint fsyncs two files (itself and its checksum): the disk fills at the first (step 2's), or
    # at the third checkpoint (step 5's, the epoch's end, after steps 2 and 4)
    full_disk.after = written_before
    run = tmp_path / "run"
    with pytest.raises(CheckpointError) as stopped:
        runs.fit(workers=2, output_dir=str(run), checkpoint_every=2, keep_checkpoints=10)
    message = str(stopped.value)
    assert "\n" not in message and "(No space left on device)" in message
    if written_before:
        assert message.startswith(f"could not write the checkpoint of step 5 to {run / 'checkpoints'}")
        assert message.endswith(f"last good checkpoint {run / 'checkpoints' / 'step-000000004.pt'}: resume with "
                                f"--resume {run}")
    else:
        assert message.endswith("no checkpoint written yet")
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_the_run_directorys_files_share_one_mode(runs, tmp_path):
    run = tmp_path / "run"
    runs.fit(workers=2, output_dir=str(run))
    modes = {p.relative_to(run).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and "checkpoints/step-000000015.pt" in modes
    assert len(set(modes.values())) == 1, modes


def test_a_copy_of_a_run_directory_resumes_and_the_original_is_not_touched(runs, tmp_path):
    # the guard keys on what a directory holds, not on where it is: a copied run resumes like its original
    run, copy = tmp_path / "run", tmp_path / "copy"
    runs.fit(workers=2, output_dir=str(run), max_steps=8, keep_checkpoints=10)
    shutil.copytree(run, copy)
    before = sorted(p.name for p in run.rglob("*"))
    again = trainer(output_dir=str(copy), resume=True, max_steps=8).fit()
    assert again.resumed_from == 8 and sorted(p.name for p in run.rglob("*")) == before


class ExplodesAt(torch.nn.Module):
    """The MLP, whose `at`-th training forward in its process raises."""

    def __init__(self, at: int):
        super().__init__()
        self.inner, self.at, self.calls = MLP["model_fn"](), at, 0

    def forward(self, x):
        self.calls += self.training
        if self.calls == self.at:
            raise ValueError("boom")
        return self.inner(x)


def test_a_replicas_error_names_the_last_good_checkpoint_and_the_resume_command(runs, tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "step-000000006.pt"
    with pytest.raises(ReplicaError, match=rf"ValueError: boom; last good checkpoint {last}: resume with "
                                           rf"--resume {run}$"):
        runs.fit(case=dict(MLP, model_fn=partial(ExplodesAt, 8)), workers=2, output_dir=str(run), checkpoint_every=2,
                 on_error="stop")


def test_a_model_fn_that_builds_differently_per_process_fails_at_start_in_one_line(runs):
    built = []

    def model_fn():  # the driver's call, then each replica's: a wider model every time
        built.append(len(built))
        return mlp(16, 4, 8 + len(built))

    with pytest.raises(ConfigError, match=r"^model_fn: built a different model in this replica than in the driver "
                                          r"\(size mismatch for 0.weight: .*\): make it deterministic"):
        runs.fit(case=dict(MLP, model_fn=model_fn), workers=2)
