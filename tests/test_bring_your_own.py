"""Your own model, dataset and loss by import path; the built-in digits; `raytorch config show`; the
worked example."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raytorch import ConfigError, TrainConfig, Trainer
from raytorch.cli import main, parse_config
from raytorch.config.imports import load
from raytorch.tasks.resolve import loss_function, training
from reference import assert_same_parameters, train_reference

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def test_import_paths_and_loss_names():
    assert load("user_code:model", "model")().weight.shape == (1, 1)
    assert isinstance(loss_function("CrossEntropyLoss"), torch.nn.CrossEntropyLoss)
    assert loss_function("user_code:half_mse").__name__ == "half_mse"


@pytest.mark.parametrize("field, value, message", [
    ("model", "nowhere.at_all:model",
     r"model: cannot import nowhere\.at_all \(ModuleNotFoundError: No module named 'nowhere'\)"),
    ("model", "user_code:missing", r"model: user_code has no 'missing'"),
    ("dataset", "user_code:broken", r"dataset: calling broken\(\) failed: RuntimeError: no data today"),
    ("loss", "Hinge", r"loss: 'Hinge' is not a torch.nn loss; use one of .*CrossEntropyLoss"),
    ("model", "resnet",
     r"model: unknown model 'resnet'; choose one of linear, mlp, or give your own as pkg\.module:factory"),
])
def test_bad_names_say_what_failed(field, value, message):
    with pytest.raises(ConfigError, match=message):
        training(TrainConfig(**{field: value}))


def test_your_dataset_needs_your_model_and_a_loss():
    with pytest.raises(ConfigError, match=r"model: built-in models need a built-in dataset"):
        training(TrainConfig(dataset="user_code:data"))
    with pytest.raises(ConfigError, match=r"loss: your own dataset needs a loss"):
        training(TrainConfig(dataset="user_code:train_only", model="user_code:model"))


def test_cli_trains_your_model_on_your_data_like_plain_pytorch(ray_local, tmp_path, capsys):
    # `raytorch train` in this process, on the session's Ray (the entry point in a fresh process with
    # a Ray of its own: test_cli's default job); replicas import user_code from tests/ as any module
    job = dict(epochs=2, batch_size=16, lr=1e-4, optimizer="sgd", seed=5)
    assert main(["train", "--model", "user_code:model", "--dataset", "user_code:data", "--loss", "user_code:half_mse",
                 "--output-dir", str(tmp_path), *(f"--{k.replace('_', '-')}={v}" for k, v in job.items())]) == 0
    assert "Final loss is: " in capsys.readouterr().out  # the eval set came with the data
    trained = torch.nn.Linear(1, 1)
    trained.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    from user_code import data, half_mse, model

    expected, _ = train_reference(model, data()[0], half_mse, **job)
    assert_same_parameters(trained, expected)


def test_a_bad_path_on_the_command_line_fails_before_ray_starts(capsys):
    assert main(["train", "--model", "nowhere:model"]) == 2
    assert capsys.readouterr().err.startswith("raytorch: error: model: cannot import nowhere")


def test_digits_alone_reach_95_percent_eval_accuracy_with_their_recipe(ray_local):
    config = parse_config(["--dataset", "digits"])  # `raytorch train --dataset digits`, no other flag
    what = training(config)
    result = Trainer(config, model_fn=what.model_fn, dataset_fn=what.dataset_fn,
                     eval_dataset_fn=what.eval_dataset_fn, loss_fn=what.loss_fn, quiet=True).fit()
    assert len(result.eval_accuracies) == 20
    assert result.eval_accuracies[-1] > 0.95


def test_config_show_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nworkers: 3\n")
    assert main(["config", "show", "--config", str(path), "--workers", "2", "--dataset", "digits"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["epochs"], shown["workers"], shown["dataset"], shown["lr"]) == (3, 2, "digits", 0.01)  # its recipe
    assert shown["model"] == "mlp"  # the model train picks for digits
    assert TrainConfig.from_dict(shown) == TrainConfig(epochs=3, workers=2, dataset="digits", model="mlp",
                                                       batch_size=64, lr=0.01, lr_schedule="constant", optimizer="adam")
    trained = parse_config(["--config", str(path), "--workers", "2", "--dataset", "digits"])  # what train runs
    assert TrainConfig.from_dict(shown) == trained


@pytest.mark.system
def test_the_worked_example_runs_as_documented(ray_local, tmp_path):
    # on the session's Ray, as on a cluster (RAY_ADDRESS): a driver's own local Ray is test_cli's and
    # test_reliability's
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "digits_cnn.py"), "--epochs", "3",
                           "--save", str(tmp_path / "cnn.pt")], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "eval accuracy" in done.stdout and (tmp_path / "cnn.pt").exists()
