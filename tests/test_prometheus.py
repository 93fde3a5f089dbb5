"""The metrics path a cluster uses: Prometheus (Debian's `prometheus`) on 127.0.0.1 scrapes the Ray
nodes listed in Ray's service-discovery file; a short run's raytorch_* figures read back through
Prometheus's query API equal the run's own."""

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import torch
from torch import nn

from raytorch import Callback, TrainConfig, Trainer
from test_ray_up import free_port

pytestmark = pytest.mark.system  # a Prometheus server scrapes the session's Ray

PROMETHEUS = shutil.which("prometheus")
WAIT_S = 90.0  # Ray exports about every 10 s; a guard, not a timing assertion


class Figures(Callback):
    def __init__(self):
        self.run, self.steps = "", []

    def on_start(self, run):
        self.run = run["run_name"]

    def on_steps(self, records):
        self.steps += records


@pytest.fixture
def prometheus(ray_local, tmp_path):
    """Prometheus scraping every node Ray lists (its file_sd file), every second."""
    if PROMETHEUS is None:
        pytest.skip("needs Debian's prometheus package (apt-get install prometheus; .ci/run installs it)")
    session = ray_local._private.worker._global_node.get_session_dir_path()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n- job_name: ray\n  file_sd_configs:\n"
        f"  - files: ['{session}/prom_metrics_service_discovery.json']\n    refresh_interval: 1s\n")
    port = free_port()
    server = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


def query(url: str, promql: str) -> list:
    address = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        return json.loads(urllib.request.urlopen(address, timeout=5).read())["data"]["result"]
    except OSError:
        return []  # not up yet


def value(url: str, promql: str):
    found = query(url, promql)
    return float(found[0]["value"][1]) if found else None


def test_prometheus_reads_the_runs_figures(prometheus):
    figures = Figures()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    config = TrainConfig(workers=2, epochs=3, batch_size=32, lr=0.01, optimizer="sgd")
    result = Trainer(config, model_fn=lambda: nn.Linear(8, 1), dataset_fn=lambda: data,
                     loss_fn=nn.functional.mse_loss, quiet=True, callbacks=[figures]).fit()
    run = f'{{run="{figures.run}"}}'
    # the last value each series had (the gauges go stale once the run has ended)
    expected = {f"last_over_time(ray_raytorch_step{run}[10m])": result.steps,
                f"last_over_time(ray_raytorch_train_loss{run}[10m])": result.epoch_losses[-1],
                f"last_over_time(ray_raytorch_samples_per_second{run}[10m])": figures.steps[-1]["samples_per_s"],
                f"max_over_time(ray_raytorch_steps_total{run}[10m])": result.steps,
                f"last_over_time(ray_raytorch_workers{run}[10m])": 2}
    deadline = time.monotonic() + WAIT_S
    while True:
        read = {promql: value(prometheus, promql) for promql in expected}
        if all(read[q] is not None and read[q] == pytest.approx(v, rel=1e-6) for q, v in expected.items()):
            break
        assert time.monotonic() < deadline, f"Prometheus has {read}, the run {expected}"
        time.sleep(1.0)
