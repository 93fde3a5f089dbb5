"""TrainConfig validation, YAML loading and the generated CLI: every bad input gets its error."""

import dataclasses
import sys

import pytest

from raytorch import ConfigError, TrainConfig
from raytorch.cli import build_parser, parse_config
from raytorch.config import BUILT_IN_DATASETS, BUILT_IN_MODELS, RECIPES, field_docs
from raytorch.driver.preflight import preflight


@pytest.mark.parametrize("changes,field", [
    ({"workers": 0}, "workers"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 1, "workers": 2}, "batch_size"),
    ({"lr": 0.0}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"lr_schedule": "linear_decay"}, "lr_schedule"),
    ({"model": "resnet"}, "model"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"device": "tpu"}, "device"),
    ({"workers": "2"}, "workers"),
    ({"shuffle": "yes"}, "shuffle"),
    ({"gpus_per_replica": 1.0}, "gpus_per_replica"),
    ({"device": "cuda", "gpus_per_replica": 1.5}, "gpus_per_replica"),
    ({"cpus_per_replica": 0}, "cpus_per_replica"),
    ({"resource_timeout": -1}, "resource_timeout"),
    ({"workers": 2, "devices": "cuda,tpu"}, "devices"),
    ({"workers": 3, "devices": "cuda,cpu"}, "devices"),
    ({"workers": 2, "devices": "cuda,cpu", "spares": 1}, "spares"),
    ({"workers": 2, "devices": "cuda,cpu", "cpus_per_replica": 0}, "cpus_per_replica"),
    ({"workers": 2, "devices": "cpu,cpu", "gpus_per_replica": 0.5}, "gpus_per_replica"),
    ({"grad_dtype": "fp16"}, "grad_dtype"),
    ({"grad_dtype": "bf16", "reduction": "shared_memory"}, "grad_dtype"),
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**changes)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert "\n" not in str(info.value)


def test_defaults_are_valid_and_ints_become_floats():
    config = TrainConfig(lr=1)
    assert isinstance(config.lr, float)
    assert config.gpus_of(0) == 0.0
    assert TrainConfig(device="cuda").gpus_of(1) == 1.0
    assert TrainConfig(device="cuda", gpus_per_replica=0.25).gpus_of(0) == 0.25


def test_devices_name_each_replicas_device_and_its_resources():
    config = TrainConfig(workers=3, devices="cuda, cuda,cpu", gpus_per_replica=0.5)
    assert config.device_names == ["cuda", "cuda", "cpu"] and config.mixed_devices
    assert [config.gpus_of(rank) for rank in range(3)] == [0.5, 0.5, 0.0]
    assert TrainConfig(workers=2, device="cuda").device_names == ["cuda", "cuda"]
    assert not TrainConfig(workers=2, device="cuda").mixed_devices


def test_every_field_has_a_docstring_and_a_flag():
    docs = field_docs()
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert all(docs.get(name) for name in fields), set(fields) - set(docs)
    help_text = build_parser().format_help()
    for name in fields:
        assert "--" + name.replace("_", "-") in help_text


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("workers: 3\nbatch_size: 30\noptimizer: sgd\n")
    config = parse_config(["--config", str(path), "--batch-size", "60", "--no-shuffle"])
    assert (config.workers, config.batch_size, config.optimizer, config.shuffle) == (3, 60, "sgd", False)


def test_yaml_round_trips(tmp_path):
    config = TrainConfig(workers=3, lr=0.1, output_dir="x")
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict()))
    assert TrainConfig.from_yaml(path) == config


@pytest.mark.parametrize("text,needle", [
    ("workers: [1, 2\n", "not valid YAML"),
    ("wrokers: 2\n", "unknown key(s) wrokers"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("workers: two\n", "workers: must be of type int"),
])
def test_bad_config_files(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        TrainConfig.from_yaml(path)
    assert needle in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_no_schedule_unless_asked_and_the_cli_recipes_fill_what_is_unset(tmp_path):
    from raytorch.cli import parse_config

    assert TrainConfig(optimizer="adam", lr=1e-3).schedule == "constant"  # as torch.optim.Adam alone
    assert TrainConfig(optimizer="sgd", lr_schedule="cosine").schedule == "cosine"
    seed_job = parse_config([])  # the seed job keeps its fast recipe
    assert (seed_job.optimizer, seed_job.lr, seed_job.schedule) == ("adam", 0.5, "cosine")
    digits = parse_config(["--dataset", "digits"])
    assert (digits.optimizer, digits.lr, digits.batch_size, digits.epochs, digits.schedule) == (
        "adam", 1e-2, 64, 20, "constant")
    (tmp_path / "run.yaml").write_text("dataset: digits\nlr: 0.003\n")
    mine = parse_config(["--config", str(tmp_path / "run.yaml"), "--epochs", "3"])  # the file and flags win
    assert (mine.lr, mine.epochs, mine.batch_size) == (0.003, 3, 64)


def test_optimizer_and_schedule_take_import_paths():
    config = TrainConfig(optimizer="mypkg.opt:make", lr_schedule="mypkg.opt:schedule")
    assert config.optimizer == "mypkg.opt:make"
    with pytest.raises(ConfigError, match=r"optimizer: unknown value 'lion'; choose one of sgd, adam, adamw, or "
                                          r"pkg\.module:fn"):
        TrainConfig(optimizer="lion")


def test_the_built_in_names_are_the_built_ins():
    """config checks model and dataset against names alone (it imports no torch): the names must be
    those of tasks/builtin.py's models and datasets, and every recipe a built-in dataset's, naming its model."""
    from raytorch.tasks.builtin import DATASETS, MODELS

    assert set(BUILT_IN_MODELS) == set(MODELS) and len(BUILT_IN_MODELS) == len(MODELS)
    assert set(BUILT_IN_DATASETS) == set(DATASETS) and len(BUILT_IN_DATASETS) == len(DATASETS)
    assert set(RECIPES) <= set(DATASETS)
    assert all(recipe["model"] == DATASETS[name].model for name, recipe in RECIPES.items())


def test_what_the_config_asks_of_the_machine_is_checked_at_preflight(tmp_path, monkeypatch):
    """A config checks values alone; preflight (Trainer.fit's first step, before Ray) checks that this
    machine has what the values ask for: the same field, the same message as ever."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard: ImportError
    config = TrainConfig(tensorboard=True, output_dir=str(tmp_path))  # values: fine
    message = r"^tensorboard: needs the tensorboard package: pip install 'raytorch\[tensorboard\]'$"
    with pytest.raises(ConfigError, match=message) as info:
        preflight(config)
    assert info.value.field == "tensorboard"
    from torch.nn.functional import mse_loss

    from raytorch import Trainer
    from raytorch.tasks.builtin import linear, linear_data

    with pytest.raises(ConfigError, match=message):  # a unit test: Ray would refuse to start here
        Trainer(config, model_fn=linear, dataset_fn=lambda: linear_data(8, 0), loss_fn=mse_loss, quiet=True).fit()
    assert not (tmp_path / "config.yaml").exists()  # nothing written: it failed before storage
    preflight(TrainConfig(tensorboard=False, output_dir=str(tmp_path)))
