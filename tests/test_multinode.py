"""Replicas on different nodes train what one plain PyTorch process trains.

The nodes are a ray.cluster_utils.Cluster on 127.0.0.1 (a head with no CPU and worker raylets),
run by tests/multinode_job.py in a subprocess: the test session holds its own Ray. One job and one
cluster serve the module: its worker nodes are reshaped for each scenario.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from multinode_job import DATA, ELASTIC_JOB, JOB, LOSS, MODEL
from raytorch import ConfigError, TrainConfig
from reference import assert_same_parameters, train_reference

JOB_SCRIPT = Path(__file__).with_name("multinode_job.py")
JOB_TIMEOUT_S = 600  # every scenario, one after another


def processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line or environment holds `marker` (Ray workers rename themselves, but
    inherit the environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(marker.encode() in (proc / part).read_bytes() for part in ("cmdline", "environ")):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


def run_job(*args: str) -> list[dict]:
    """Run multinode_job.py with its own RAY_TMPDIR; kill whatever it leaves behind, then fail on it."""
    temp_dir = tempfile.mkdtemp(prefix="rt-mn-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=temp_dir, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=str(JOB_SCRIPT.parent))  # replicas import the fault-injecting model from tests/
    job = subprocess.Popen([sys.executable, str(JOB_SCRIPT), *args], env=env, stdout=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        out, _ = job.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, _ = job.communicate()
        pytest.fail(f"multinode_job.py did not finish in {JOB_TIMEOUT_S} s; output:\n{out}")
    finally:
        left = wait_until_gone(temp_dir)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert job.returncode == 0, out
    assert not left, f"processes of the cluster in {temp_dir} left running after cluster.shutdown(): {left}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wait_until_gone(marker: str, timeout_s: float = 15.0) -> list[int]:
    """Pids still mentioning `marker` after `timeout_s`: Ray's workers exit shortly after their raylet."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)  # no event to await for another process tree's exit; poll /proc
    return left


@pytest.fixture(scope="module")
def scenario():
    """The records of every scenario of multinode_job.py (--all), by name: one job and one cluster
    for the module, its worker nodes reshaped for each scenario."""
    runs = run_job("--all")
    return lambda name: [run for run in runs if run["scenario"] == name]


@pytest.mark.system
def test_spread_and_pack_place_replicas_over_nodes_and_train_what_one_process_trains(scenario):
    # Worker nodes of 2 CPUs each: 3 one-CPU replicas fit on 2 of them (pack) or take all 3 (spread).
    runs = scenario("placement")
    spread, pack = (next(r for r in runs if r["placement"] == p) for p in ("spread", "pack"))
    assert len(set(spread["replica_nodes"])) == 3
    assert len(set(pack["replica_nodes"])) == 2
    for run in (spread, pack):
        assert set(run["replica_nodes"]) <= set(run["worker_nodes"])  # none on the CPU-less head
        assert run["wires"] == ["collective"]  # auto: replicas on several nodes share no memory: gloo among them
        assert_trained_what_one_process_trains(run)


def assert_trained_what_one_process_trains(run: dict, job: dict = JOB) -> None:
    expected, expected_losses = train_reference(MODEL, DATA(), LOSS, **job)
    assert len(run["digests"]) == 1
    trained = MODEL()
    shapes = trained.state_dict()
    trained.load_state_dict({name: torch.tensor(v).view_as(shapes[name]) for name, v in run["params"].items()})
    assert_same_parameters(trained, expected)
    assert run["epoch_losses"] == pytest.approx(expected_losses, rel=1e-5)


@pytest.mark.system
def test_a_node_lost_mid_run_is_replaced_on_a_spare_node(scenario):
    # (a node lost with no node to replace on, and the run going on with fewer: the elastic test's)
    [replaced] = scenario("node-loss")  # three nodes of one CPU
    assert replaced["removed_node"] in replaced["replica_nodes"]
    assert_trained_what_one_process_trains(replaced)
    [restart] = replaced["restarts"]
    assert restart["replicas"] == ["replica-1"] and restart["replaced"] == ["replica-1"] and restart["workers"] == 2


@pytest.mark.system
def test_an_elastic_run_grows_onto_a_node_that_joins_and_shrinks_when_one_leaves(scenario):
    [run] = scenario("elastic")  # two nodes of one CPU
    assert run["events"] == ["node added", "node removed"], run["console"]
    assert "replica-2 joined (room appeared): 3 replicas from step" in run["console"]
    [restart] = run["restarts"]  # the removed node's replica: no node to replace it on, dropped; on with fewer
    assert restart["replicas"] == ["replica-1"] and restart["dropped"] == ["replica-1"] and restart["workers"] == 2
    assert "no room for a replacement of replica-1 within replace_timeout" in run["console"]
    assert run["workers_at_end"] == 2
    assert_trained_what_one_process_trains(run, ELASTIC_JOB)


@pytest.mark.system
def test_a_replica_on_a_draining_node_is_moved_before_the_node_goes_with_nothing_redone(scenario):
    [run] = scenario("drain")  # three nodes of one CPU
    assert run["events"] == ["node draining", "node removed"], run["console"]
    assert "moved replica-1 off a draining node before step" in run["console"]
    assert run["restarts"] == [] and run["workers_at_end"] == 2  # no loss: the node went after the move
    assert run["steps_redone"] == 0
    assert_trained_what_one_process_trains(run, ELASTIC_JOB)


def test_placement_is_a_checked_choice():
    assert TrainConfig().placement == "pack"
    with pytest.raises(ConfigError, match="placement: unknown value 'strict_spread'; choose one of pack, spread"):
        TrainConfig(placement="strict_spread")
