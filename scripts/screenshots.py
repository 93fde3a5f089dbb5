#!/usr/bin/env python3
"""Make the README's pictures with the project's own commands:

    python scripts/screenshots.py   # docs/: dashboard-jobs, dashboard-job-log, dashboard-actor-log, loss (.png)

Starts a local Ray (127.0.0.1, with its dashboard), runs `scripts/train.py` against it as a job of
its own, photographs the dashboard's Jobs page with headless Chromium while the run is going (through
a loopback proxy that adds the auth token), and copies the run's loss curve. Then submits a second
run with `raytorch train --submit` and photographs its job page (with the job's log) and the first
replica's actor page (with its progress lines).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

TRAIN = ["--dataset", "classification", "--model", "mlp", "--epochs", "12", "--batch-size", "64", "--lr", "0.01"]


def main() -> int:
    from browser import chromium, render, token_proxy
    from raytorch.group.cluster import keep_on_loopback

    if not chromium():
        print("needs Chromium (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    keep_on_loopback()
    import ray

    # a submitted job runs `python` from the cluster's PATH: this environment's, where raytorch is
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    dashboard = ray._private.worker.get_dashboard_url()
    run_dir = Path(tempfile.mkdtemp(prefix="raytorch-screenshots-"))
    driver = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *TRAIN, "--address",
                               ray.get_runtime_context().gcs_address, "--output-dir", str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        for line in driver.stdout:  # the picture is taken once the run is past its first epoch
            print(line, end="")
            if line.startswith("Epoch 1:"):
                break
        with token_proxy(dashboard) as proxy:
            render(f"{proxy}/#/jobs", screenshot=ROOT / "docs" / "dashboard-jobs.png", size="1400,620")
        print(driver.stdout.read(), end="")
        driver.wait()
        with token_proxy(dashboard) as proxy:
            submitted(proxy, f"http://{dashboard}", render)
    finally:
        driver.wait()
        ray.shutdown()
    shutil.copy(run_dir / "loss.png", ROOT / "docs" / "loss.png")
    print("wrote docs/dashboard-jobs.png, docs/dashboard-job-log.png, docs/dashboard-actor-log.png, docs/loss.png")
    return driver.returncode


def submitted(proxy: str, dashboard: str, render) -> None:
    """A run submitted with --submit: its job page once the log shows epochs, and replica-0's actor page."""
    import json
    import re
    import time
    import urllib.request

    from ray.util.state import list_actors

    from browser import token

    submit = subprocess.run([sys.executable, "-m", "raytorch.cli", "train", "--submit", "--detach", "--address",
                             dashboard, *TRAIN, "--epochs", "400"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "RAY_AUTH_MODE": "token"})
    print(submit.stdout, submit.stderr, end="")
    job_id = re.search(r"^Job (\S+) submitted", submit.stdout, re.M).group(1)

    def job_log() -> str:
        request = urllib.request.Request(f"{dashboard}/api/jobs/{job_id}/logs",
                                         headers={"Authorization": f"Bearer {token()}"})
        return json.loads(urllib.request.urlopen(request, timeout=10).read())["logs"]

    while not re.search(r"^Epoch 3:", job_log(), re.M):
        time.sleep(1)
    render(f"{proxy}/#/jobs/{job_id}", screenshot=ROOT / "docs" / "dashboard-job-log.png", size="1400,1100",
           wait_ms=20000)
    os.environ["RAY_AUTH_MODE"] = "token"
    time.sleep(12)  # a progress line every 10 s
    run = re.search(r"^Run (raytorch-[\w-]+):", job_log(), re.M).group(1)
    [actor] = [a for a in list_actors(filters=[("ray_namespace", "=", run)], detail=True) if a.name == "replica-0"]
    render(f"{proxy}/#/actors/{actor.actor_id}", screenshot=ROOT / "docs" / "dashboard-actor-log.png",
           size="1400,1100", wait_ms=20000)
    subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "stop", "--address", dashboard, job_id],
                   capture_output=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"})


if __name__ == "__main__":
    sys.exit(main())
