"""cluster.yaml and cluster-local.yaml against Ray's own schema and rules, offline and without Ray running.

`ray up` first runs `prepare_config` (Ray's defaults for the provider merged in: for AWS a file read,
no boto3, no network) and `validate_config` (ray/autoscaler/ray-schema.json plus Ray's own rules); only
then does it ask the provider to fill in and bootstrap, which for AWS needs credentials and the network.
These tests run those first two steps.
"""

import copy
import logging
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
FILES = ["cluster.yaml", "cluster-local.yaml"]


@pytest.fixture(autouse=True)
def quiet(caplog):
    caplog.set_level(logging.WARNING, logger="ray.autoscaler")  # Ray logs each default it fills in


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("config validation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def check(raw: dict) -> dict:
    """What `ray up` checks before it reaches a provider; returns the prepared config."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", FILES)
def test_config_passes_rays_checks(name):
    config = check(load(name))
    # The README's install (setup_commands merged into the head's and the workers' lists).
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        assert any("pip install -q -e '.[test]'" in c for c in commands)


def test_aws_head_drives_and_workers_train():
    config = check(load("cluster.yaml"))
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert {"cpu_worker", "gpu_worker"} <= types.keys()
    for worker in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[worker]["min_workers"] <= types[worker]["max_workers"] <= config["max_workers"]
    # CPU nodes take the CPU wheel; GPU workers, whose list replaces the common one, the CUDA build.
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu"
    assert any("torch==2.13.0" in c and cpu_index in c for c in config["head_setup_commands"])
    assert any("torch==2.13.0" in c and cpu_index in c for c in config["worker_setup_commands"])
    gpu_setup = types["gpu_worker"]["worker_setup_commands"]
    assert any("torch==2.13.0" in c and "--index-url" not in c for c in gpu_setup)
    assert any("torch.cuda.is_available()" in c for c in gpu_setup)
    assert any("-e '.[test]'" in c for c in gpu_setup)


def test_local_provider_takes_the_machines_given():
    raw = load("cluster-local.yaml")
    config = check(raw)
    (node_type,) = config["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(raw["provider"]["worker_ips"])
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])  # the head trains nothing


@pytest.mark.parametrize("name", FILES)
def test_project_synced_dashboard_on_loopback_token_auth_on(name):
    text, config = (ROOT / name).read_text(), check(load(name))
    assert config["file_mounts"]["~/raytorch"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c for c in config["head_setup_commands"])
    assert "RAY_AUTH_MODE=disabled" not in text
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in text


@pytest.mark.parametrize("name,keys", [
    ("cluster.yaml", ["region:", "ImageId:"]),
    ("cluster-local.yaml", ["head_ip:", "worker_ips:", "ssh_user:", "ssh_private_key:"]),
])
def test_values_a_user_must_set_say_so(name, keys):
    lines = (ROOT / name).read_text().splitlines()
    for key in keys:
        found = [line for line in lines if line.strip().startswith(key)]
        assert found and all("# FILL IN" in line for line in found), (key, found)


def with_unknown_key(raw):
    raw["not_a_field"] = 1


def with_unknown_auth_key(raw):
    raw["auth"]["ssh_port"] = 2222  # Ray's ssh takes no port: tests/test_ray_up.py relays instead


def with_wrong_type(raw):
    raw["idle_timeout_minutes"] = "five"


def with_command_as_argv(raw):
    raw["setup_commands"].append(["pip", "install", "-e", "."])  # a command is one string


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("breakage,message", [
    (with_unknown_key, r"Additional properties are not allowed \('not_a_field' was unexpected\)"),
    (with_unknown_auth_key, r"Additional properties are not allowed \('ssh_port' was unexpected\)"),
    (with_wrong_type, r"'five' is not of type 'number'"),
    (with_command_as_argv, r"\['pip', 'install', '-e', '.'\] is not of type 'string'"),
])
def test_broken_config_is_rejected(name, breakage, message):
    raw = load(name)
    breakage(raw)
    with pytest.raises(jsonschema.ValidationError, match=message):
        check(raw)


@pytest.mark.parametrize("name", FILES)
def test_config_without_provider_is_rejected(name):
    raw = load(name)
    del raw["provider"]
    # prepare_config looks the provider's defaults up before any check: it fails on the lookup...
    with pytest.raises(KeyError, match="provider"):
        prepare_config(copy.deepcopy(raw))
    # ...and the schema, applied to the file as written, names what is missing.
    with pytest.raises(jsonschema.ValidationError, match="'provider' is a required property"):
        validate_config(raw)
