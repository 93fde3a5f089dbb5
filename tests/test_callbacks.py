"""Callbacks: the records a run hands them, a failing one left out, MLflow (a real `mlflow server`
on 127.0.0.1 and a file: store) and W&B (offline) as users run them, model.safetensors."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model
from torch import nn

from raytorch import Callback, ConfigError, TrainConfig, Trainer
from raytorch.cli import parse_config
from raytorch.output.callbacks import Callbacks, named_callback

HANG_GUARD_S = 120  # a guard against hangs, not a timing assertion


class Recorder(Callback):
    """What a user's callback sees: every hook, in order."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []

    def on_start(self, run):
        self.calls.append(("start", run))

    def on_step(self, record):
        self.calls.append(("step", record))

    def on_epoch(self, record):
        self.calls.append(("epoch", record))

    def on_eval(self, record):
        self.calls.append(("eval", record))

    def on_checkpoint(self, record):
        self.calls.append(("checkpoint", record))

    def on_end(self, result):
        self.calls.append(("end", result))

    def of(self, kind):
        return [value for name, value in self.calls if name == kind]


class Broken(Callback):
    def __init__(self):
        self.steps = 0

    def on_step(self, record):
        self.steps += 1
        if record["step"] == 3:
            raise RuntimeError("tracker went away")


# -- without Ray -------------------------------------------------------------------------------------


def test_a_failing_callback_is_left_out_with_one_line_and_the_others_go_on():
    said, broken, recorder = [], Broken(), Recorder()
    callbacks = Callbacks(said.append, (broken, recorder))
    for step in range(1, 6):
        callbacks.call("on_steps", [{"event": "step", "step": step}])
    assert broken.steps == 3 and [r["step"] for r in recorder.of("step")] == [1, 2, 3, 4, 5]
    assert said == ["callback Broken failed in on_steps: RuntimeError: tracker went away; left out for the rest "
                    "of the run"]


def test_records_reach_their_hooks():
    recorder = Recorder()
    for event in ("epoch", "eval", "checkpoint", "early_stop"):
        recorder.on_record({"event": event})
    assert [name for name, _ in recorder.calls] == ["epoch", "eval", "checkpoint"]


class NotACallback:
    pass


@pytest.mark.parametrize("spec,message", [
    ("neptune", "give 'mlflow', 'wandb' or pkg.module:Class"),
    ("no_such_module_x:Thing", "cannot be imported"),
    ("test_callbacks:NotACallback", "made a NotACallback, not a raytorch.Callback subclass"),
])
def test_bad_callback_names_fail_early(spec, message):
    with pytest.raises(ConfigError, match=message):
        if ":" in spec:
            named_callback(spec)
        else:
            TrainConfig(callbacks=spec)


def test_the_built_in_names_are_the_trackers_and_a_missing_package_says_what_to_install(monkeypatch):
    from raytorch import trackers
    from raytorch.config import BUILT_IN_CALLBACKS, load

    assert {name: load(path, "callbacks") for name, path in BUILT_IN_CALLBACKS.items()} == {
        "mlflow": trackers.MLflowCallback, "wandb": trackers.WandbCallback}
    for name in ("mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # not installed: import raises ImportError
        with pytest.raises(ConfigError, match=rf"^callbacks: the {name} callback needs {name}: "
                                              rf"pip install 'raytorch\[{name}\]'$"):
            named_callback(name)


def test_an_mlflow_store_that_does_not_answer_fails_before_the_run(tmp_path):
    from raytorch.trackers import MLflowCallback

    with pytest.raises(ConfigError, match="callbacks: MLflow tracking store 'http://127.0.0.1:9' cannot be used"):
        MLflowCallback(tracking_uri="http://127.0.0.1:9")


def test_the_cli_takes_callbacks_by_name():
    config = parse_config(["--callback", "mlflow,test_callbacks:Recorder"])
    assert config.callbacks == "mlflow,test_callbacks:Recorder"
    assert isinstance(named_callback("test_callbacks:Recorder"), Recorder)


# -- a real run, four callbacks at once ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite store and artifacts served by the server."""
    root, port = tmp_path_factory.mktemp("mlflow"), free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--artifacts-destination",
                               str(root / "artifacts"), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


def mlp():
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def regression(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


@pytest.fixture(scope="module")
def tracked_run(ray_local, mlflow_server, tmp_path_factory):
    """One run: a recorder, a callback that breaks at step 3, MLflow to the server and to a file:
    store, W&B offline."""
    from raytorch.trackers import MLflowCallback, WandbCallback

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 keeps the file store behind this opt-in
    root = tmp_path_factory.mktemp("tracked")
    recorder = Recorder()
    callbacks = [recorder, Broken(), MLflowCallback(tracking_uri=mlflow_server, experiment="ci"),
                 MLflowCallback(tracking_uri=f"file:{root / 'mlruns'}"),
                 WandbCallback(project="ci", mode="offline", dir=str(root))]
    config = TrainConfig(workers=2, epochs=2, batch_size=16, lr=0.05, optimizer="sgd", log_every=2, eval_every=4,
                         output_dir=str(root / "run"))
    result = Trainer(config, model_fn=mlp, dataset_fn=regression, eval_dataset_fn=lambda: regression(32, 1),
                     loss_fn=nn.functional.mse_loss, quiet=True, callbacks=callbacks).fit()
    return root, recorder, callbacks, result


@pytest.mark.system
def test_a_callback_sees_the_run_as_it_goes(tracked_run):
    root, recorder, _, result = tracked_run
    (start,) = recorder.of("start")
    assert start["config"]["lr"] == 0.05 and start["run_dir"] == str(root / "run")
    assert sorted(r["rank"] for r in start["replicas"]) == [0, 1]
    steps = recorder.of("step")
    assert [r["step"] for r in steps] == list(range(1, result.steps + 1))  # every step, not only the logged ones
    assert all(sum(r["split"]) == r["samples"] == 16 for r in steps)
    assert [r["loss"] for r in recorder.of("epoch")] == pytest.approx(result.epoch_losses)
    assert [r["step"] for r in recorder.of("eval")] == [4, 8]
    assert len(recorder.of("checkpoint")) == 2
    assert recorder.calls[-1] == ("end", result)
    # the callback that raised was left out, said on stderr; the run's own file still has every record it should
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 4, 6, 8, 10, 12]


def mlflow_run(client):
    (experiment,) = [e for e in client.search_experiments() if e.name in ("ci", "raytorch")]
    (run,) = client.search_runs([experiment.experiment_id])
    return run


@pytest.mark.system
@pytest.mark.parametrize("store", ["server", "file"])
def test_mlflow_holds_the_config_the_curves_and_the_model(tracked_run, mlflow_server, store, tmp_path):
    from mlflow.tracking import MlflowClient

    root, recorder, _, result = tracked_run
    client = MlflowClient(mlflow_server if store == "server" else f"file:{root / 'mlruns'}")
    run = mlflow_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.05" and run.data.params["workers"] == "2"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    expected = {r["step"]: r["loss"] for r in recorder.of("step") if r["step"] % 2 == 0 or r["step"] == 1}
    assert logged == pytest.approx(expected)
    epochs = client.get_metric_history(run.info.run_id, "epoch_loss")
    assert [m.value for m in sorted(epochs, key=lambda m: m.step)] == pytest.approx(result.epoch_losses)
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted(m.step for m in evals) == [4, 6, 8, 12]  # mid-epoch (eval_every 4) and at each epoch's end
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "model.safetensors", "config.yaml", "metrics.jsonl"} <= names
    model = mlp()
    load_model(model, client.download_artifacts(run.info.run_id, "model.safetensors", str(tmp_path)))
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.system
def test_wandb_offline_run_is_written_and_sync_reads_it(tracked_run):
    root, _, callbacks, _ = tracked_run
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    (events,) = run_dir.glob("run-*.wandb")
    data = events.read_bytes()
    for key in (b"train_loss", b"epoch_loss", b"eval_loss", b"model.safetensors", b"0.05"):
        assert key in data, key
    sync = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(run_dir)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert sync.returncode == 0, sync.stderr
    assert "Would sync 1 run(s)" in sync.stdout + sync.stderr and events.name in sync.stdout + sync.stderr


@pytest.mark.system
def test_the_final_model_loads_back_from_safetensors_in_one_line(tracked_run):
    root, _, _, result = tracked_run
    model = mlp()
    load_model(model, root / "run" / "model.safetensors")
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    from safetensors import safe_open

    with safe_open(root / "run" / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["raytorch_config"])["lr"] == 0.05
    assert (root / "run" / "config.yaml").exists()
    for checkpoint in (root / "run" / "checkpoints").glob("*.pt"):  # checkpoints stay loadable without pickle
        torch.load(checkpoint, weights_only=True)
