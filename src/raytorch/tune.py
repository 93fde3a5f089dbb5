"""Ray Tune: each trial is one raytorch run whose replicas live in the trial's resources.

    from ray import tune
    from raytorch.tune import trainable

    tuner = tune.Tuner(
        trainable(model_fn=..., dataset_fn=..., loss_fn=..., eval_dataset_fn=..., workers=2, epochs=8),
        param_space={"lr": tune.loguniform(1e-4, 1e-1), "batch_size": tune.choice([32, 64])},
        tune_config=tune.TuneConfig(metric="eval_loss", mode="min", scheduler=tune.schedulers.ASHAScheduler()),
    )
    best = tuner.fit().get_best_result()

param_space keys are TrainConfig fields. A trial asks Tune for a placement group of one bundle
for its driver and one per replica (and spare); the run places its replicas in those bundles
(placement.reserve_replicas), so trials never compete for room outside what Tune gave them. Each
epoch reports train_loss, eval_loss, eval_accuracy, epoch, step, samples_per_s with the epoch's
checkpoint (eval_every: evaluations in between, without one); a trial resumed by Tune (paused,
or restored after a failure) continues from its last checkpoint, with the same result.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from .config import TrainConfig, read_yaml, with_recipe
from .errors import ConfigError
from .output.callbacks import Callback
from .persist.checkpoint import checksum_name, directory, listed
from .replica.device import replica_resources

RUN_DIR = "raytorch-run"  # inside the trial's directory


def trial_config(base: dict, params: dict) -> TrainConfig:
    """A trial's config: the base fields, then the sampled ones (each a TrainConfig field)."""
    unknown = sorted(set(params) - set(base))
    if unknown:
        raise ConfigError("param_space", f"unknown key(s) {', '.join(unknown)}: param_space keys are TrainConfig "
                                         f"fields")
    return TrainConfig.from_dict({**base, **params}, source="param_space")


def trial_bundles(config: TrainConfig, driver_cpus: float) -> list[dict[str, float]]:
    """The driver's bundle, then one per replica and spare."""
    if config.device == "auto":
        raise ConfigError("device", "a Tune trial asks for its resources up front: set device to cpu or cuda")
    return [{"CPU": driver_cpus}] + [replica_resources(config, rank) for rank in range(config.workers + config.spares)]


def trainable(*, model_fn: Callable, dataset_fn: Callable, loss_fn: Optional[Callable] = None,
              eval_dataset_fn: Optional[Callable] = None, step_fn: Optional[Callable] = None,
              optimizer_fn: Optional[Callable] = None, schedule_fn: Optional[Callable] = None,
              collate_fn: Optional[Callable] = None, driver_cpus: float = 1.0, **base_config: Any):
    """What ray.tune.Tuner takes: one raytorch run per trial, in the trial's resources.
    base_config: TrainConfig fields every trial shares (param_space samples the others).
    driver_cpus: the trial driver's bundle (it plans the steps and gathers the losses)."""
    from ray import tune

    base = TrainConfig(**base_config)  # checked now, before any trial
    if base.max_workers is not None or base.output_dir is not None:
        raise ConfigError("max_workers" if base.max_workers is not None else "output_dir",
                          "a Tune trial runs in the resources Tune gives it, and writes in its trial directory: "
                          "leave it unset")
    base_fields = base.to_dict()
    functions = {"model_fn": model_fn, "dataset_fn": dataset_fn, "loss_fn": loss_fn, "step_fn": step_fn,
                 "eval_dataset_fn": eval_dataset_fn, "optimizer_fn": optimizer_fn, "schedule_fn": schedule_fn,
                 "collate_fn": collate_fn}

    def raytorch_trial(params: dict) -> None:
        from .driver.trainer import Trainer

        run_dir = Path(tune.get_context().get_trial_dir()) / RUN_DIR
        config = trial_config(base_fields, {**params, "output_dir": str(run_dir)})
        resume = restore_into(tune.get_checkpoint(), run_dir)
        Trainer(config, quiet=True, resume_from=str(run_dir) if resume else None, callbacks=[TuneReport()],
                **{name: fn for name, fn in functions.items() if fn is not None}).fit()

    def resources(params: dict):
        config = trial_config(base_fields, params)
        return tune.PlacementGroupFactory(trial_bundles(config, driver_cpus), strategy=config.placement.upper())

    return tune.with_resources(raytorch_trial, resources)


def restore_into(checkpoint, run_dir: Path) -> bool:
    """A Tune checkpoint's raytorch checkpoint into run_dir/checkpoints; False without one."""
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as source:
        target = directory(run_dir)
        target.mkdir(parents=True, exist_ok=True)
        for path in directory(source).iterdir():
            shutil.copy2(path, target / path.name)
    return True


class TuneReport(Callback):
    """Reports each epoch to Tune with the checkpoint written at its end (the newest raytorch
    checkpoint alone, with its checksum), and each mid-epoch evaluation without one."""

    def __init__(self):
        self.run_dir: Optional[str] = None
        self.pending: Optional[dict] = None  # an epoch's figures, waiting for its checkpoint

    def on_start(self, run: dict) -> None:
        self.run_dir = run["run_dir"]

    def on_epoch(self, record: dict) -> None:
        self.pending = {"train_loss": record["loss"], "eval_loss": record["eval_loss"],
                        "eval_accuracy": record["eval_accuracy"], "epoch": record["epoch"], "step": record["steps"],
                        "samples_per_s": record["samples_per_s"]}

    def on_eval(self, record: dict) -> None:
        self.report({"eval_loss": record["eval_loss"], "eval_accuracy": record["eval_accuracy"],
                     "epoch": record["epoch"], "step": record["step"]})

    def on_checkpoint(self, record: dict) -> None:
        if self.pending is None:  # a mid-epoch checkpoint (checkpoint_every): the epoch's comes later
            return
        from ray import tune

        newest = listed(self.run_dir)[0]
        with tempfile.TemporaryDirectory() as staged:
            folder = directory(staged)
            folder.mkdir()
            for path in (str(newest), checksum_name(str(newest))):
                shutil.copy2(path, folder / Path(path).name)
            self.report(self.pending, tune.Checkpoint.from_directory(staged))  # Tune copies it before returning
        self.pending = None

    def on_end(self, result) -> None:
        if self.pending is not None and result is not None:  # stopped early: no checkpoint after the epoch
            self.report(self.pending)

    @staticmethod
    def report(metrics: dict, checkpoint=None) -> None:
        from ray import tune

        tune.report({name: value for name, value in metrics.items() if value is not None}, checkpoint=checkpoint)


# -- raytorch tune --config search.yaml ----------------------------------------------------------------

SAMPLERS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}


def search_space(search: dict) -> dict:
    """A YAML search space as Tune's: {field: {loguniform: [lo, hi]}} (uniform, randint alike),
    {field: {choice: [...]}}, {field: {grid: [...]}}, or a plain value for every trial."""
    from ray import tune

    space = {}
    for name, spec in (search or {}).items():
        if not isinstance(spec, dict):
            space[name] = spec
            continue
        if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"search.{name}", f"give one of {', '.join(SAMPLERS)} "
                                                f"(e.g. {{loguniform: [1e-4, 1e-1]}}), got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values or (SAMPLERS[kind] and len(values) != SAMPLERS[kind]):
            raise ConfigError(f"search.{name}", f"{kind} takes a list{' of two bounds' if SAMPLERS[kind] else ''}, "
                                                f"got {values!r}")
        if kind in ("loguniform", "uniform"):
            values = [float(v) for v in values]  # YAML reads 1e-4 as a string (1.0e-4 as a float)
        space[name] = (tune.grid_search(values) if kind == "grid" else
                       tune.choice(values) if kind == "choice" else getattr(tune, kind)(*values))
    return space


SEARCH_KEYS = {"train", "search", "trials", "metric", "mode", "scheduler", "max_concurrent", "storage", "name",
               "driver_cpus"}


def read_search(path: str) -> dict:
    """search.yaml, checked: train (TrainConfig fields every trial shares), search (the sampled
    fields), trials, metric, mode, scheduler (asha or fifo), max_concurrent, storage, name."""
    spec = read_yaml(path)
    unknown = sorted(set(spec) - SEARCH_KEYS)
    if unknown:
        raise ConfigError(path, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(SEARCH_KEYS))}")
    if spec.get("scheduler", "asha") not in ("asha", "fifo"):
        raise ConfigError(f"{path}: scheduler", f"asha or fifo, got {spec['scheduler']!r}")
    if spec.get("mode", "min") not in ("min", "max"):
        raise ConfigError(f"{path}: mode", f"min or max, got {spec['mode']!r}")
    unknown = sorted(set(spec.get("search") or {}) - {f for f in TrainConfig.__dataclass_fields__})
    if unknown:
        raise ConfigError(f"{path}: search", f"unknown field(s) {', '.join(unknown)}: the keys are TrainConfig fields")
    return spec


def run_search(path: str, address: Optional[str] = None):
    """`raytorch tune --config search.yaml`: the search, on a local Ray or the cluster at address;
    returns Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .group.cluster import ray_session
    from .tasks.resolve import training

    spec = read_search(path)
    base = with_recipe(dict(spec.get("train") or {}))
    base = {name: value for name, value in base.items() if name not in (spec.get("search") or {})}
    what = training(TrainConfig.from_dict(base, source=f"{path}: train"))  # the named model and data, imported
    metric, mode = spec.get("metric", "eval_loss"), spec.get("mode", "min")
    asha = spec.get("scheduler", "asha") == "asha"
    scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=1) if asha else FIFOScheduler()
    with ray_session(address or base.get("address"), {"job_name": f"raytorch-tune-{Path(path).stem}"}):
        tuner = tune.Tuner(
            trainable(model_fn=what.model_fn, dataset_fn=what.dataset_fn, loss_fn=what.loss_fn,
                      eval_dataset_fn=what.eval_dataset_fn, driver_cpus=spec.get("driver_cpus", 1.0), **base),
            param_space=search_space(spec.get("search")),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                        num_samples=spec.get("trials", 1),
                                        max_concurrent_trials=spec.get("max_concurrent")),
            run_config=tune.RunConfig(name=spec.get("name"), storage_path=spec.get("storage"), verbose=1))
        return tuner.fit()
