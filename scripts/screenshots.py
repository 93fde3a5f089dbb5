#!/usr/bin/env python3
"""Make the README's pictures with the project's own commands:

    python scripts/screenshots.py        # writes docs/dashboard-jobs.png and docs/loss.png

Starts a local Ray (127.0.0.1, with its dashboard), runs `scripts/train.py` against it as a job of
its own, photographs the dashboard's Jobs page with headless Chromium while the run is going (through
a loopback proxy that adds the auth token), and copies the run's loss curve.
"""

from __future__ import annotations

import logging
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
    from raytorch.cluster import keep_on_loopback

    if not chromium():
        print("needs Chromium (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    keep_on_loopback()
    import ray

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
    finally:
        driver.wait()
        ray.shutdown()
    shutil.copy(run_dir / "loss.png", ROOT / "docs" / "loss.png")
    print("wrote docs/dashboard-jobs.png, docs/loss.png")
    return driver.returncode


if __name__ == "__main__":
    sys.exit(main())
