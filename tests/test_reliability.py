"""Faults injected for real (SIGKILL, ray.kill, SIGSTOP, NaN, a lost checkpoint, a killed driver):
every run that goes on ends with the parameters and losses of an uninterrupted one."""

import os
import re
import signal
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from faults import Gated, Poisoned, gated
from polling import wait_for
from raytorch import CheckpointError, NonFiniteError, TrainConfig, Trainer
from raytorch.compat import rayprivate
from raytorch.persist.checkpoint import listed
from raytorch.tasks.builtin import classification_data, linear_data, mlp
from reference import assert_same_parameters, train_reference
from test_driver_unit import runs as runs  # noqa: F401  (the fixture: Trainer.fit on in-process replicas, no Ray)

ROOT = Path(__file__).resolve().parent.parent
JOB = dict(epochs=3, batch_size=16, lr=1e-4, optimizer="sgd", seed=3)  # 30 steps per epoch
DATA = partial(linear_data, 480, 3)
# A killed replica is seen at once (its calls fail): there step_timeout only has to outlast the
# injector, however slow the machine. A stopped one is found by step_timeout: short, the gate then
# holding only the victim, so that its peers wait on the wire (not computing) and are never hung.
KILLED_STEP_TIMEOUT_S = 120.0
HUNG_STEP_TIMEOUT_S = 3.0


def reference(**overrides):
    job = {**JOB, **overrides}
    return train_reference(partial(torch.nn.Linear, 1, 1), DATA(), F.mse_loss, **job)


def assert_matches_reference(result, **overrides):
    model, losses = reference(**overrides)
    assert_same_parameters(result.model, model)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    assert len(set(result.replica_digests)) == 1


def live_actors(*filters):
    """The live actors of this session's Ray, through Ray's state API: asked at its address (without
    one, Ray looks for the Ray of this machine and refuses where it finds several)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE"), *filters])


def replica_process(name, reached_pids):
    """The live actor named `name` of this run, found through Ray's state API."""
    actors = [a for a in live_actors(("name", "=", name)) if a.pid in reached_pids]
    assert len(actors) == 1, actors
    return actors[0]


def inject(folder: Path, workers: int, fault, name="replica-1", spares=0):
    """Once every replica has reached the gate (and the spares are built), apply `fault` to replica
    `name`, then open the gate."""

    def run():
        reached = lambda: {int(p.name.split("-")[1]) for p in folder.glob("reached-*")}  # noqa: E731
        try:
            wait_for(lambda: len(reached()) >= workers, "the replicas to reach the gate")
            wait_for(lambda: spares == len([a for a in live_actors() if a.name.startswith("spare-")
                                            and a.pid in alive_pids()]), "the spares")
            fault(replica_process(name, reached()))
        finally:  # whatever happened, no replica stays held
            (folder / "hold").unlink()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def alive_pids():
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def sigkill(actor):
    os.kill(actor.pid, signal.SIGKILL)


def ray_kill(actor):
    import ray

    ray.kill(ray.get_actor(actor.name, namespace=actor.ray_namespace))


def sigstop(actor):
    os.kill(actor.pid, signal.SIGSTOP)  # a hang: the process exists, and answers nothing


def gated_run(tmp_path, at=40, only=None, **config):
    folder = tmp_path / "gate"
    folder.mkdir()
    (folder / "hold").touch()
    trainer = Trainer(TrainConfig(**{**JOB, **config}), model_fn=partial(Gated, str(folder), at, only),
                      dataset_fn=DATA, loss_fn=F.mse_loss)
    return folder, trainer


@pytest.mark.parametrize("reduction, fault, cause, spares", [
    ("shared_memory", sigkill, "ActorDiedError", 0),
    ("object_store", sigkill, "ActorDiedError", 0),
    ("shared_memory", ray_kill, "ActorDiedError", 0),
    ("shared_memory", sigstop, "hang", 0),
    ("shared_memory", sigkill, "ActorDiedError", 1),
    ("collective", sigkill, "ActorDiedError", 0),
    ("collective", sigstop, "hang", 0),
])
def test_a_lost_replica_is_replaced_and_the_run_is_unchanged(ray_local, tmp_path, capsys, reduction, fault, cause,
                                                             spares):
    # Only replica-1 is held; a hang is found by step_timeout, whether it is stopped by then (no answer
    # to a ping) or still held at the gate (one step computing): it is the victim either way.
    step_timeout = HUNG_STEP_TIMEOUT_S if cause == "hang" else KILLED_STEP_TIMEOUT_S
    folder, trainer = gated_run(tmp_path, only="replica-1", workers=2, reduction=reduction,
                                step_timeout=step_timeout, spares=spares, output_dir=str(tmp_path / "run"))
    injector = inject(folder, 2, fault, spares=spares)
    result = trainer.fit()
    injector.join()
    assert_matches_reference(result)
    [restart] = result.restarts
    assert restart["replicas"] == ["replica-1"] and restart["cause"] == cause
    assert restart["replaced"] == ["replica-1"] and restart["workers"] == 2
    assert restart["spares_used"] == ["spare-2"] * spares  # the spare sits in bundle 2
    # hit in epoch 1: the gate holds replicas at step 39 (ray.kill lands a little later)
    assert 38 <= restart["step"] < 60
    assert restart["recovery_s"] > 0
    assert result.steps_redone <= 1  # at most the interrupted step: its gradient computed, not applied
    out = capsys.readouterr().out
    assert "restarts: 1 (replica-1, step" in out and "recovered: first step after the loss" in out
    events = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "replica_lost" in line]
    assert len(events) == 1
    if cause == "hang":  # its Python stack, taken (py-spy) before it was killed, stopped in its forward
        assert re.search(r"replica-1 \(.*; stuck in \S+ \(\S+\.py:\d+\)\): treated as dead", out), out
        assert "replica/actor.py" in restart["stacks"]["replica-1"] and '"stacks"' in events[0]


def test_no_room_for_a_replacement_goes_on_with_fewer_replicas(ray_local, tmp_path, capsys):
    # A replacement gets replace_timeout to start; 1 ms is too short for any process to start.
    folder, trainer = gated_run(tmp_path, workers=3, replace_timeout=0.001)
    injector = inject(folder, 3, sigkill)
    result = trainer.fit()
    injector.join()
    assert_matches_reference(result)
    [restart] = result.restarts
    assert restart["dropped"] == ["replica-1"] and restart["workers"] == 2
    assert "going on with 2 replicas" in capsys.readouterr().out


# Below min_workers, the stop with a checkpoint and the resume from it: test_driver_unit (in-process
# replicas, the same checkpoint files); a replacement with no room in time on Ray: the test above.


@pytest.mark.parametrize("reduction", ["shared_memory", "collective"])
def test_nonfinite_loss_stops_the_run_naming_step_and_replica(ray_local, tmp_path, reduction):
    data = DATA()
    data.x[16 * 4 + 12] = -7  # step 4 of epoch 0 (no shuffle), in the second replica's half
    config = TrainConfig(**{**JOB, "shuffle": False}, workers=2, output_dir=str(tmp_path / "run"),
                         reduction=reduction)
    with pytest.raises(NonFiniteError, match=r"replica 1: non-finite loss nan at step 4 \(epoch 0\); "
                                             r"no checkpoint written"):
        Trainer(config, model_fn=Poisoned, dataset_fn=lambda: data, loss_fn=F.mse_loss, quiet=True).fit()


@pytest.mark.parametrize("reduction", ["shared_memory", "collective"])
def test_nonfinite_step_skipped_on_every_replica(ray_local, reduction):
    data = DATA()
    data.x[16 * 4 + 12] = -7
    config = TrainConfig(**{**JOB, "shuffle": False}, workers=2, on_nonfinite="skip", reduction=reduction)
    result = Trainer(config, model_fn=Poisoned, dataset_fn=lambda: data, loss_fn=F.mse_loss, quiet=True).fit()
    assert result.skipped_steps == [4, 34, 64]  # the poisoned sample is in step 4 of every epoch
    model, losses = train_reference(Poisoned, data, F.mse_loss, **{**JOB, "shuffle": False}, skip_nonfinite=True)
    assert_same_parameters(result.model, model)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    assert len(set(result.replica_digests)) == 1


def test_resume_from_a_mid_epoch_checkpoint_ends_like_an_uninterrupted_run(runs, tmp_path, capsys):
    # on in-process replicas (the same Replica code and checkpoint files; a resume on Ray, onto
    # another W: the sharded Adam run below)
    run = tmp_path / "run"
    config = TrainConfig(**JOB, workers=2, output_dir=str(run), checkpoint_every=7, keep_checkpoints=100)
    full = Trainer(config, model_fn=partial(torch.nn.Linear, 1, 1), dataset_fn=DATA, loss_fn=F.mse_loss,
                   quiet=True).fit()
    steps = sorted(int(p.name[5:14]) for p in listed(run))
    assert steps == sorted({*range(7, 90, 7), 30, 60, 90})
    # The run "stopped" after step 49: later checkpoints never written, the last one half written.
    for path in listed(run):
        if int(path.name[5:14]) > 49:
            path.unlink()
    newest = listed(run)[0]
    newest.write_bytes(newest.read_bytes()[:100])
    resumed = Trainer(TrainConfig(**JOB, workers=3, output_dir=str(run)), model_fn=partial(torch.nn.Linear, 1, 1),
                      dataset_fn=DATA, loss_fn=F.mse_loss, resume_from=str(run)).fit()
    out = capsys.readouterr().out
    assert "skipping a checkpoint: " in out and "step-000000049.pt: checksum mismatch" in out
    assert resumed.resumed_from == 42  # epoch 1, step 12 of 30, on 3 replicas instead of 2
    assert_same_parameters(resumed.model, full.model)
    assert resumed.epoch_losses == pytest.approx(full.epoch_losses, rel=1e-6)
    assert_matches_reference(resumed)


def test_a_sharded_adam_run_checkpoints_its_whole_state_and_resumes_on_fewer_replicas(ray_local, tmp_path):
    """Three replicas step their chunks of an MLP and of Adam's state in shared buffers (zero.py);
    its checkpoints hold the whole state (the optimizer's state_dict reads it there): resumed from
    step 49 on two replicas, which step everything each, the run ends as one process's does."""
    run = tmp_path / "run"
    model_fn, data = partial(mlp, 16, 4, 32), partial(classification_data, 480, 3)
    job = dict(epochs=3, batch_size=16, lr=0.01, optimizer="adam", seed=3)
    config = TrainConfig(**job, workers=3, reduction="shared_memory", output_dir=str(run), checkpoint_every=7,
                         keep_checkpoints=100)
    full = Trainer(config, model_fn=model_fn, dataset_fn=data, loss_fn=F.cross_entropy, quiet=True).fit()
    for path in listed(run):
        if int(path.name[5:14]) > 49:
            path.unlink()
    resumed = Trainer(TrainConfig(**job, workers=2, output_dir=str(run)), model_fn=model_fn, dataset_fn=data,
                      loss_fn=F.cross_entropy, quiet=True, resume_from=str(run)).fit()
    assert resumed.resumed_from == 49
    expected, losses = train_reference(model_fn, data(), F.cross_entropy, **job)
    for result in (full, resumed):
        assert_same_parameters(result.model, expected)
        assert result.epoch_losses == pytest.approx(losses, rel=1e-5)


def test_resume_refuses_a_different_run_and_a_foreign_file(runs, tmp_path):  # in process: refused before Ray
    run = tmp_path / "run"
    Trainer(TrainConfig(**{**JOB, "epochs": 1}, output_dir=str(run)), model_fn=partial(torch.nn.Linear, 1, 1),
            dataset_fn=DATA, loss_fn=F.mse_loss, quiet=True).fit()
    with pytest.raises(CheckpointError,
                       match=r"trained with lr=0.0001, this run asks for 0.5: resume with the same lr"):
        Trainer(TrainConfig(**{**JOB, "epochs": 1, "lr": 0.5}), model_fn=partial(torch.nn.Linear, 1, 1),
                dataset_fn=DATA, loss_fn=F.mse_loss, resume_from=str(run), quiet=True).fit()
    with pytest.raises(CheckpointError, match=r"nothing to resume from in .*no checkpoint in"):
        Trainer(TrainConfig(**JOB), model_fn=partial(torch.nn.Linear, 1, 1), dataset_fn=DATA, loss_fn=F.mse_loss,
                resume_from=str(tmp_path / "elsewhere"), quiet=True).fit()


@pytest.mark.system
def test_sigterm_stops_between_steps_with_a_checkpoint_and_the_resume_command(ray_local, tmp_path):
    """What `ray job stop`, Kubernetes and Slurm send: the run stops after the calls in flight, writes a
    checkpoint (no periodic one is asked for), prints the command that resumes it, exits 143; that
    command finishes the run with plain PyTorch's result."""
    run = tmp_path / "run"
    job = dict(JOB, epochs=8)
    args = ["--address", ray_local.get_runtime_context().gcs_address, "--epochs", "8", "--batch-size", "16",
            "--lr", "1e-4", "--optimizer", "sgd", "--seed", "3", "--workers", "2", "--output-dir", str(run),
            "--log-every", "1"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    train = [sys.executable, str(ROOT / "scripts" / "train.py")]
    driver = subprocess.Popen(train + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run / "metrics.jsonl"
        wait_for(lambda: (metrics.exists() and '"step"' in metrics.read_text()) or driver.poll() is not None,
                 "the run's first steps")
        assert driver.poll() is None, "the run finished before it could be stopped"
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 143, stderr
    assert listed(run) and not (run / "model.pt").exists()
    said = [line for line in stderr.splitlines() if "resume with: raytorch train " in line]
    assert said and said[0].startswith("raytorch: stopped by SIGTERM before step "), stderr
    resume = said[0].split("resume with: raytorch train ", 1)[1].split()
    assert resume[-2:] == ["--resume", str(run)]
    done = subprocess.run(train + resume, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    model = torch.nn.Linear(1, 1)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    from raytorch.tasks.builtin import DATASETS

    task = DATASETS["linear"]
    expected, _ = train_reference(partial(torch.nn.Linear, 1, 1), task.train(3), task.loss, **job)
    assert_same_parameters(model, expected)


@pytest.mark.system
def test_a_killed_driver_leaves_nothing_of_its_local_ray_and_a_rerun_with_resume_finishes_the_job(ray_local,
                                                                                                   tmp_path):
    """SIGKILL of a driver that started its own local Ray, after its first checkpoint: within 10 s
    none of the processes it started (Ray's agents included) is left; the same command with
    --resume (here on the session's Ray) finishes the job with plain PyTorch's result. The killed
    driver ran with --quiet: it trained (its checkpoint) and printed nothing, Ray's warning as its
    local Ray started included."""
    import psutil

    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--epochs", "3", "--batch-size", "16", "--lr",
               "1e-4", "--optimizer", "sgd", "--seed", "3", "--workers", "2", "--output-dir", str(run),
               "--checkpoint-every", "50"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    out, err = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    driver = subprocess.Popen(command + ["--quiet"], env=env, stdout=out, stderr=err)
    try:
        wait_for(lambda: listed(run) or driver.poll() is not None, "the driver's first checkpoint")
        assert driver.poll() is None, "the driver finished before it could be killed"
        started = psutil.Process(driver.pid).children(recursive=True)
        agents = [p for p in started if "Agent" in " ".join(p.cmdline())]
        assert agents, [p.cmdline()[:1] for p in started]  # Ray's agents, the ones that used to stay
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait()
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [(p.pid, p.cmdline()[:1]) for p in alive]
    assert not (run / "model.pt").exists()
    assert (tmp_path / "stdout").read_text() == ""  # --quiet
    assert rayprivate.TOKEN_AUTH_ENABLED not in (tmp_path / "stderr").read_text()
    rerun = command + ["--address", ray_local.get_runtime_context().gcs_address, "--resume", str(run)]
    done = subprocess.run(rerun, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "Epoch 2:" in done.stdout
    model = torch.nn.Linear(1, 1)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    # the CLI's built-in 'linear' dataset (10,000 samples: 1,875 steps) trained by plain PyTorch
    from raytorch.tasks.builtin import DATASETS

    task = DATASETS["linear"]
    expected, _ = train_reference(partial(torch.nn.Linear, 1, 1), task.train(3), task.loss, **JOB)
    assert_same_parameters(model, expected)


@pytest.mark.parametrize("optimizer", ["adam"])  # state of its own in every chunk: what a loss could lose
def test_a_chunk_owner_lost_under_a_sharded_update_is_replaced_and_the_run_is_unchanged(ray_local, tmp_path, capsys,
                                                                                        optimizer):
    """Four replicas each step their own chunk of an MLP's parameters, and of Adam's state
    (zero.py); replica-2, which owns one, is killed: replaced, and the run ends as one process's does.
    (SGD's stateless chunks under the sharded update: test_training_features at W = 3.)"""
    folder = tmp_path / "gate"
    folder.mkdir()
    (folder / "hold").touch()
    model_fn, data = partial(mlp, 16, 4, 32), partial(classification_data, 480, 3)
    job = dict(epochs=3, batch_size=16, lr=0.1 if optimizer == "sgd" else 0.01, optimizer=optimizer, seed=3)
    trainer = Trainer(TrainConfig(**job, workers=4, reduction="shared_memory", step_timeout=KILLED_STEP_TIMEOUT_S),
                      model_fn=partial(gated, model_fn, str(folder), 40), dataset_fn=data, loss_fn=F.cross_entropy)
    injector = inject(folder, 4, sigkill, name="replica-2")
    result = trainer.fit()
    injector.join()
    expected, losses = train_reference(model_fn, data(), F.cross_entropy, **job)
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    assert len(set(result.replica_digests)) == 1
    [restart] = result.restarts
    assert restart["replaced"] == ["replica-2"] and restart["workers"] == 4
    assert "each replica steps its own 1/W of the parameters and optimizer state" in capsys.readouterr().out
