"""What a user sees of a run in Ray's own tools (real Ray, loopback): the state API, the dashboard's
Jobs page in a real browser, the node's Prometheus endpoint, the run directory, and `ray job submit`
to a cluster started with `ray start --head`."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from browser import chromium, render, token, token_proxy
from polling import wait_for
from test_multinode import wait_until_gone
from test_ray_up import free_port, get_json

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
WAIT_S = 60.0


def prometheus(port: int, run: str) -> dict[str, float]:
    """raytorch's series of one run on a node's Prometheus endpoint: name -> value (the replica's
    all-reduce histogram summed over replicas)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(ray_raytorch_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        if f'run="{run}"' in labels and "_bucket" not in name:
            values[name] = values.get(name, 0.0) + float(value)
    return values


@pytest.mark.system
def test_a_run_in_the_state_api_the_jobs_page_prometheus_and_its_run_directory(ray_local, tmp_path):
    from ray.util.state import list_actors, list_tasks

    gate, run_dir = tmp_path / "gate", tmp_path / "run"
    gate.mkdir()
    (gate / "hold").touch()
    driver = subprocess.Popen(
        [sys.executable, str(TESTS / "gated_job.py"), ray_local.get_runtime_context().gcs_address, str(gate),
         str(run_dir)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(TESTS)})
    try:
        first = driver.stdout.readline()
        started = re.match(r"Run (raytorch-[\w-]+): Ray at 127\.0\.0\.1:\d+, dashboard http://(\S+)", first)
        run, dashboard = started.groups()
        wait_for(lambda: len(list(gate.glob("reached-*"))) == 2 or driver.poll() is not None, "replicas at the gate")
        assert driver.poll() is None
        # the state API (of this session's Ray: without an address Ray looks for the Ray of this
        # machine, and refuses where it finds several): named replicas in the run's namespace, their
        # repr naming the run
        address = ray_local.get_runtime_context().gcs_address
        actors = [a for a in list_actors(address=address, filters=[("ray_namespace", "=", run)], detail=True)
                  if a.state == "ALIVE"]
        assert sorted(a.name for a in actors) == ["replica-0", "replica-1"]
        assert all(a.repr_name.endswith(f"device=cpu, run={run})") for a in actors), [a.repr_name for a in actors]
        # the job, with its name and config, as the Jobs page reads it
        status, jobs = get_json(f"http://{dashboard}/api/jobs/", token())
        [job] = [j for j in jobs if (j.get("metadata") or {}).get("job_name") == run]
        assert job["status"] == "RUNNING" and json.loads(job["metadata"]["raytorch_config"])["workers"] == 2
        # step calls named for the task list (task events reach the GCS in batches)
        def step_calls():
            names = {t.name for t in list_tasks(address=address, filters=[("job_id", "=", job["job_id"])], limit=1000)}
            return sorted(n for n in names if re.fullmatch(r"epoch 0 steps \d+-\d+", n))

        assert wait_for(lambda: len(calls := step_calls()) >= 2 and calls, "named step calls")[0] == "epoch 0 steps 0-0"
        # a real browser renders the Jobs page with the run's name
        if chromium():
            with token_proxy(dashboard) as proxy:
                assert run in render(f"{proxy}/#/jobs")
    finally:
        (gate / "hold").unlink()
        out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 0, out
    result = json.loads(out.splitlines()[-1])

    # Prometheus: the node's endpoint, values batched about every 10 s
    port = ray_local.nodes()[0]["MetricsExportPort"]
    metrics = wait_for(lambda: (m := prometheus(port, run)).get("ray_raytorch_steps_total") == result["steps"]
                       and "ray_raytorch_train_loss" in m and m, "raytorch's metrics on Prometheus", 40)
    assert metrics["ray_raytorch_samples_total"] == result["samples"]
    assert metrics["ray_raytorch_train_loss"] == pytest.approx(result["epoch_losses"][-1], rel=1e-6)
    assert metrics["ray_raytorch_epoch"] == 1 and metrics["ray_raytorch_workers"] == 2
    assert metrics["ray_raytorch_step_seconds_count"] >= 1 and metrics["ray_raytorch_allreduce_seconds_count"] >= 2

    # the run directory: per-step and per-epoch records that match the run, and the loss curve
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["loss"] for r in epochs] == result["epoch_losses"]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, *range(5, 41, 5)] and all(math.isfinite(r["loss"]) for r in steps)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Loss curve: " in out


def test_tensorboard_event_files_hold_the_run(ray_local, tmp_path):
    from functools import partial

    import torch.nn.functional as F
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raytorch import TrainConfig, Trainer
    from raytorch.tasks.builtin import linear, linear_data

    config = TrainConfig(workers=2, epochs=2, batch_size=16, lr=1e-4, optimizer="sgd", output_dir=str(tmp_path),
                         tensorboard=True, log_every=4)
    result = Trainer(config, model_fn=linear, dataset_fn=partial(linear_data, 160, 0), loss_fn=F.mse_loss,
                     quiet=True).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 4, 8, 12, 16, 20]
    assert [e.value for e in events.Scalars("train/epoch_loss")] == pytest.approx(result.epoch_losses, rel=1e-6)


@pytest.mark.system
def test_ray_job_submit_to_a_ray_start_head_cluster(ray_local, tmp_path):
    """`ray start --head` on 127.0.0.1, then `raytorch train --submit` (Ray's Job Submission SDK, the
    repository as working directory): the job succeeds and carries its name, and the console follows
    its log with the epochs."""
    temp_dir = tempfile.mkdtemp(prefix="rt-job-", dir="/tmp")  # marks the cluster's processes; short for sockets
    # every port of its own: the session's Ray holds the defaults (dashboard agent, client server)
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "ray-client-server-port")}
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--num-cpus", "2", "--include-dashboard", "true", *(f"--{flag}={port}" for flag, port in ports.items())],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"

    def submit(*flags):
        return subprocess.run([sys.executable, "-m", "raytorch.cli", "train", "--submit", "--address", address,
                               *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    try:
        wait_for(lambda: get_json(f"{address}/api/version", token(), deadline_s=WAIT_S)[0] == 200,
                 "the head's dashboard")
        done = submit("--epochs", "2", "--batch-size", "500")
        assert done.returncode == 0, done.stdout + done.stderr
        job_id = re.search(r"^Job (\S+) submitted to http://127\.0\.0\.1:\d+ \(dashboard: ", done.stdout, re.M).group(1)
        assert re.search(r"^Epoch 0: loss=", done.stdout, re.M), done.stdout  # the job's log, followed
        assert re.search(r"^Epoch 1: loss=", done.stdout, re.M), done.stdout
        assert f"Ray at 127.0.0.1:{ports['port']}" in done.stdout  # the job joined the head, on loopback
        status, jobs = get_json(f"{address}/api/jobs/", token())
        [job] = [j for j in jobs if j.get("submission_id") == job_id]
        assert job["status"] == "SUCCEEDED" and job["metadata"]["job_name"].startswith("raytorch-")
        assert "--submit" not in job["entrypoint"] and "--address" not in job["entrypoint"]
        # (a job that fails there, its exit code and line: test_submit.py, from the job's status)
    finally:
        # `ray start --block` stops its cluster on SIGTERM, in ~4 s (sent to its whole process group
        # instead, the signal reaches its children too, and it took 35-60 s to exit)
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
        left = wait_until_gone(temp_dir, timeout_s=30)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the cluster in {temp_dir} left running: {left}"


def test_the_grafana_dashboard_queries_only_metrics_raytorch_exports():
    """docs/grafana/raytorch.json: every series it reads is one raytorch defines (output/metrics.py,
    replica/metrics.py), as Prometheus names it (Ray's `ray_` prefix; `_total` on counters;
    `_bucket` on histograms)."""
    import ray.util.metrics as ray_metrics

    from raytorch.output.metrics import RunMetrics
    from raytorch.replica.metrics import ReplicaMetrics

    made = {}
    real = {kind: getattr(ray_metrics, kind) for kind in ("Gauge", "Counter", "Histogram")}

    def recorder(kind):
        def build(name, *args, **kwargs):
            made[name] = kind
            return real[kind](name, *args, **kwargs)
        return build

    try:
        for kind in real:
            setattr(ray_metrics, kind, recorder(kind))
        RunMetrics("r").close()
        ReplicaMetrics("r", "replica-0")
    finally:
        for kind, cls in real.items():
            setattr(ray_metrics, kind, cls)
    suffix = {"Gauge": [""], "Counter": ["_total"], "Histogram": ["_bucket", "_sum", "_count"]}
    exported = {f"ray_{name}{end}" for name, kind in made.items() for end in suffix[kind]}
    dashboard = json.loads((ROOT / "docs" / "grafana" / "raytorch.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries.append(next(v for v in dashboard["templating"]["list"] if v["name"] == "run")["definition"])
    used = {name for q in queries for name in re.findall(r"\bray_raytorch_\w+", q)}
    assert used and used <= exported, used - exported
    assert {"ray_raytorch_train_loss", "ray_raytorch_eval_loss", "ray_raytorch_replica_restarts_total",
            "ray_raytorch_step_seconds_bucket", "ray_raytorch_allreduce_seconds_bucket"} <= used
