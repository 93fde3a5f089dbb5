"""raytorch's public face (issue 28: the modules move into layers, the names users write stay): each
name README documents imports from where README says, and is the object it describes. No Ray is
started (these are unit tests: conftest.py fails one that starts Ray)."""

import dataclasses
import importlib
import importlib.metadata
import inspect
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

import raytorch

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
ERRORS = ["RaytorchError", "ConfigError", "ClusterError", "ReplicaError", "NonFiniteError", "CheckpointError"]
PUBLIC = ["Trainer", "TrainConfig", "Callback", "TrainResult", *ERRORS, "sample_generator", "seeded", "seeded_forward"]
HOOKS = ["on_start", "on_step", "on_epoch", "on_eval", "on_checkpoint", "on_replica_lost", "on_record", "on_end"]


def test_the_public_names_import_from_raytorch():
    from raytorch import (  # noqa: F401  the line README's users write
        Callback,
        CheckpointError,
        ClusterError,
        ConfigError,
        NonFiniteError,
        RaytorchError,
        ReplicaError,
        TrainConfig,
        Trainer,
        TrainResult,
        sample_generator,
        seeded,
        seeded_forward,
    )


def test_all_lists_the_public_names():
    assert sorted(raytorch.__all__) == sorted(PUBLIC)
    assert all(hasattr(raytorch, name) for name in raytorch.__all__)


def test_the_errors_are_raytorchs_own():
    from raytorch import errors

    for name in ERRORS:
        error = getattr(raytorch, name)
        assert error is getattr(errors, name) and issubclass(error, raytorch.RaytorchError)
    assert issubclass(raytorch.RaytorchError, Exception)
    assert raytorch.ConfigError("lr", "must be positive").field == "lr"  # "names the field"
    assert str(raytorch.ConfigError("lr", "must be positive")) == "lr: must be positive"
    lost = raytorch.ReplicaError("replica 1 failed at step 3", rank=1, step=3)  # "names the replica and its step"
    assert (lost.rank, lost.step) == (1, 3)


def test_train_config_is_one_documented_dataclass():
    assert dataclasses.is_dataclass(raytorch.TrainConfig)
    assert raytorch.TrainConfig().workers == 2  # the defaults: the seed note's job on 2 replicas


def test_the_trainer_takes_what_readme_shows():
    parameters = inspect.signature(raytorch.Trainer).parameters
    assert list(parameters)[0] == "config"
    assert {"model_fn", "dataset_fn", "loss_fn", "step_fn", "eval_dataset_fn", "callbacks"} <= set(parameters)
    assert callable(raytorch.Trainer.fit)


def test_train_result_holds_what_readme_lists():
    fields = {f.name for f in dataclasses.fields(raytorch.TrainResult)}
    assert {"epoch_losses", "eval_losses", "model", "steps", "samples", "wall_time_s", "epoch_times_s",
            "time_to_first_step_s", "replica_digests", "replica_memory", "restarts", "skipped_steps", "resumed_from",
            "replica_samples", "steps_redone", "profile"} <= fields
    assert isinstance(raytorch.TrainResult.eval_loss, property)


def test_a_callback_overrides_only_the_hooks_it_needs():
    class PrintEpochs(raytorch.Callback):
        def on_epoch(self, record):
            self.seen = record["epoch"]

    for hook in HOOKS:  # the base's hooks do nothing
        assert getattr(raytorch.Callback(), hook)({"event": "step"} if hook != "on_end" else None) is None
    callback = PrintEpochs()
    callback.on_record({"event": "epoch", "epoch": 2})  # on_record gets every record, hands it to its hook
    callback.on_steps([{"event": "step", "step": 1}])
    assert callback.seen == 2


def test_augmentation_is_seeded_per_sample():
    with raytorch.seeded(0, 1, 2):
        first = torch.rand(3, generator=raytorch.sample_generator())
    with raytorch.seeded(0, 1, 2):
        again = torch.rand(3, generator=raytorch.sample_generator())
    with raytorch.seeded(0, 1, 3):
        other = torch.rand(3, generator=raytorch.sample_generator())
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert raytorch.sample_generator() is torch.default_generator  # outside a fetch


def test_tune_offers_a_trainable():
    tune = importlib.import_module("raytorch.tune")
    parameters = inspect.signature(tune.trainable).parameters
    assert {"model_fn", "dataset_fn", "loss_fn", "eval_dataset_fn"} <= set(parameters)


def test_the_trackers_are_callbacks():
    trackers = importlib.import_module("raytorch.trackers")
    for tracker, arguments in [(trackers.MLflowCallback, ["tracking_uri", "experiment", "run_name"]),
                               (trackers.WandbCallback, ["project", "mode", "dir"])]:
        assert issubclass(tracker, raytorch.Callback)
        assert list(inspect.signature(tracker).parameters)[:3] == arguments


def test_npy_dataset_reads_pairs_from_two_files(tmp_path):
    from raytorch.data import NpyDataset

    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float32).reshape(3, 2))
    np.save(tmp_path / "y.npy", np.array([0, 1, 2]))
    dataset = NpyDataset(tmp_path / "x.npy", tmp_path / "y.npy")
    x, y = dataset[1]
    assert len(dataset) == 3 and np.array_equal(np.asarray(x), [2.0, 3.0]) and int(y) == 1


def test_the_console_script_resolves_to_the_cli():
    script = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]["raytorch"]
    assert script == "raytorch.cli:main"
    module, name = script.split(":")
    main = getattr(importlib.import_module(module), name)
    assert callable(main)
    installed = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "raytorch"]
    if not installed:
        pytest.skip("raytorch is not installed (pip install -e .): no console script to check")
    assert installed[0].value == script and installed[0].load() is main


def test_the_cli_has_a_flag_for_every_config_field():
    from raytorch.cli import build_parser

    actions = {flag: action for action in build_parser()._actions for flag in action.option_strings}
    flags = {f.name: actions.get("--" + f.name.replace("_", "-")) for f in dataclasses.fields(raytorch.TrainConfig)}
    missing = [name for name, action in flags.items() if action is None or action.dest != name]
    assert not missing, f"TrainConfig fields without their --flag: {missing}"
    undocumented = [name for name, action in flags.items() if not action.help or action.help.startswith(" (default")]
    assert not undocumented, f"flags whose --help says nothing (the field's docstring): {undocumented}"
