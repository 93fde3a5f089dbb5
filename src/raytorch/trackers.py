"""Experiment trackers as callbacks: MLflow and Weights & Biases (extras: pip install
'raytorch[mlflow]' or 'raytorch[wandb]'; neither is a dependency of raytorch itself).

Each logs the resolved config as the run's parameters, the train loss and samples/s every
log_every steps, each epoch's and evaluation's figures, replica losses, and at the end the run
directory's loss.png, model.safetensors, config.yaml and metrics.jsonl (where output_dir is set).
A config names them 'mlflow' and 'wandb' (config/recipes.py's BUILT_IN_CALLBACKS: import paths to
the classes here, loaded as your own pkg.module:Class is).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .output.callbacks import Callback

ARTIFACTS = ("loss.png", "model.safetensors", "config.yaml", "metrics.jsonl")
CHECK_TIMEOUT_S = 10.0


def _need(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise ConfigError("callbacks", f"the {extra} callback needs {module}: pip install 'raytorch[{extra}]'") from e


def epoch_metrics(record: dict) -> dict[str, float]:
    """An epoch record's figures under the names both trackers use."""
    figures = {"epoch": record["epoch"], "epoch_loss": record["loss"], "epoch_time_s": record["epoch_time_s"],
               "epoch_samples_per_s": record["samples_per_s"], "eval_loss": record["eval_loss"],
               "eval_accuracy": record["eval_accuracy"]}
    return {name: float(value) for name, value in figures.items() if value is not None}


def artifacts(run_dir: Optional[str]) -> list[Path]:
    """The run directory's files a tracker keeps, those that exist."""
    if not run_dir:
        return []
    return [Path(run_dir) / name for name in ARTIFACTS if (Path(run_dir) / name).exists()]


def check_store(client) -> None:
    """The tracking store answers now, before Ray starts, or the run does not start. A server is
    asked once with a short timeout (MLflow's own client retries for minutes); a local store (file:,
    sqlite:) is read."""
    uri = client.tracking_uri
    try:
        if uri.startswith(("http://", "https://")):
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CHECK_TIMEOUT_S).close()
            except urllib.error.HTTPError:
                pass  # it answers (a server behind auth may say 401 or 404 here)
        else:
            client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 -- many kinds: connection, store, permissions
        raise ConfigError("callbacks", f"MLflow tracking store {uri!r} cannot be used: "
                                       f"{type(e).__name__}: {str(e)[:300]}") from e


class MLflowCallback(Callback):
    """A run in MLflow: params (the resolved config), metrics per step and epoch, artifacts.

    tracking_uri: default MLFLOW_TRACKING_URI (a server's http://..., or file:./mlruns);
    experiment: default MLFLOW_EXPERIMENT_NAME, else 'raytorch'. Metrics go in batches, at most
    every flush_s seconds (and at each epoch's end), so a remote server does not slow the steps."""

    def __init__(self, tracking_uri: Optional[str] = None, experiment: Optional[str] = None,
                 run_name: Optional[str] = None, flush_s: float = 2.0):
        _need("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        check_store(self.client)
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "raytorch"
        self.run_name, self.flush_s = run_name, flush_s
        self.run_id: Optional[str] = None
        self.run_dir: Optional[str] = None
        self.every = 10
        self.pending: list = []
        self.flushed = time.monotonic()

    def on_start(self, run: dict) -> None:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name or run["run_name"],
                                             tags={"raytorch.run": run["run_name"]}).info.run_id
        self.run_dir, self.every = run["run_dir"], run["config"]["log_every"]
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in sorted(run["config"].items())])

    def on_step(self, record: dict) -> None:
        if self.every and (record["step"] % self.every == 0 or record["step"] == 1):
            self.log({"train_loss": record["loss"], "samples_per_s": record["samples_per_s"]}, record["step"])
            if time.monotonic() - self.flushed > self.flush_s:
                self.flush()

    def on_epoch(self, record: dict) -> None:
        self.log(epoch_metrics(record), record["steps"])
        self.flush()

    def on_eval(self, record: dict) -> None:
        self.log({name: record[name] for name in ("eval_loss", "eval_accuracy") if record[name] is not None},
                 record["step"])

    def on_replica_lost(self, record: dict) -> None:
        self.log({"workers": record["workers"]}, record["step"] or 0)
        self.client.set_tag(self.run_id, f"raytorch.replica_lost.{int(record['detected_at'])}",
                            f"{', '.join(record['replicas'])}: {record['cause']}")

    def on_end(self, result: Optional[Any]) -> None:
        if self.run_id is None:
            return
        self.flush()
        if result is not None:
            for path in artifacts(self.run_dir):
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED" if result is not None else "FAILED")

    def log(self, figures: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(name, float(value), now, step) for name, value in figures.items()]

    def flush(self) -> None:
        while self.pending:  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=self.pending[:1000])
            self.pending = self.pending[1000:]
        self.flushed = time.monotonic()


class WandbCallback(Callback):
    """A run in Weights & Biases: its config, metrics per step and epoch, the model as an artifact.

    project: default WANDB_PROJECT, else 'raytorch'; mode: 'online', 'offline' (then `wandb sync`
    uploads it later) or None for WANDB_MODE; dir: where wandb keeps its files (default the run
    directory, else wandb's own)."""

    def __init__(self, project: Optional[str] = None, mode: Optional[str] = None, dir: Optional[str] = None,
                 **init_kwargs: Any):
        self.wandb = _need("wandb", "wandb")
        self.project = project or os.environ.get("WANDB_PROJECT") or "raytorch"
        self.mode, self.dir, self.init_kwargs = mode, dir, init_kwargs
        self.run: Optional[Any] = None
        self.run_dir: Optional[str] = None
        self.every = 10

    def on_start(self, run: dict) -> None:
        self.run_dir, self.every = run["run_dir"], run["config"]["log_every"]
        self.run = self.wandb.init(project=self.project, name=run["run_name"], config=run["config"], mode=self.mode,
                                   dir=self.dir or self.run_dir, **self.init_kwargs)

    def on_step(self, record: dict) -> None:
        if self.every and (record["step"] % self.every == 0 or record["step"] == 1):
            self.run.log({"train_loss": record["loss"], "samples_per_s": record["samples_per_s"]},
                         step=record["step"])

    def on_epoch(self, record: dict) -> None:
        self.run.log(epoch_metrics(record), step=record["steps"])

    def on_eval(self, record: dict) -> None:
        self.run.log({name: record[name] for name in ("eval_loss", "eval_accuracy") if record[name] is not None},
                     step=record["step"])

    def on_replica_lost(self, record: dict) -> None:
        self.run.summary["replicas_lost"] = self.run.summary.get("replicas_lost", 0) + len(record["replicas"])

    def on_end(self, result: Optional[Any]) -> None:
        if self.run is None:
            return
        files = artifacts(self.run_dir) if result is not None else []
        if files:
            artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model")
            for path in files:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if result is not None else 1)

