"""An I/O-bound input pipeline (scripts/bench.py --prefetch): a dataset whose __getitem__ waits 1 ms
per sample (as reading a file does), W = 2, global batch 32, the 1.86 M-parameter MLP, SGD.
raytorch fetching in the step (loader_workers 0) and in the background (loader_workers 4), and Ray
Train (TorchTrainer + DDP) fed by DataLoader(num_workers=4) on the same dataset; steps/s of the
second epoch (the first warms up), alternating rounds.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from workloads import WORKLOADS

WAIT_S = 0.001
SAMPLES = 32 * 40  # 40 steps an epoch
WORKERS = 4


class SlowImages(torch.utils.data.Dataset):
    """The MLP workload's images, each fetched after a 1 ms wait."""

    def __init__(self):
        data = WORKLOADS["mlp"].data_fn(SAMPLES)
        self.x, self.y = np.asarray(data.x), np.asarray(data.y)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        time.sleep(WAIT_S)
        return torch.from_numpy(self.x[i]), torch.as_tensor(self.y[i])


def raytorch(loader_workers: int) -> float:
    from raytorch import TrainConfig, Trainer

    config = TrainConfig(workers=2, epochs=2, batch_size=32, lr=0.01, optimizer="sgd", shuffle=False,
                         loader_workers=loader_workers)
    result = Trainer(config, model_fn=WORKLOADS["mlp"].model_fn, dataset_fn=SlowImages, loss_fn=F.cross_entropy,
                     quiet=True).fit()
    return (SAMPLES // 32) / result.epoch_times_s[1]


def _ray_train_loop(config: dict) -> None:
    import ray.train
    from ray.train.torch import prepare_data_loader, prepare_model

    model = prepare_model(WORKLOADS["mlp"].model_fn())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = prepare_data_loader(torch.utils.data.DataLoader(SlowImages(), batch_size=16, num_workers=WORKERS,
                                                             persistent_workers=True))
    seconds = 0.0
    for epoch in range(2):
        started = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        seconds = time.perf_counter() - started
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump({"steps_per_s": (SAMPLES // 32) / seconds}, f)


def ray_train(storage: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.path.join(storage, f"prefetch-{time.time_ns()}.json")
    TorchTrainer(_ray_train_loop, train_loop_config={"out": out},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 run_config=RunConfig(storage_path=storage, name=f"prefetch-{time.time_ns()}")).fit()
    with open(out) as f:
        return json.load(f)["steps_per_s"]


def main(rounds: int) -> dict:
    runs = {"raytorch, fetch in the step": lambda _: raytorch(0),
            f"raytorch, loader_workers {WORKERS}": lambda _: raytorch(WORKERS),
            f"Ray Train, DataLoader(num_workers={WORKERS})": ray_train}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as storage:
        for round_ in range(rounds):
            for name, run in runs.items():
                rates[name].append(run(storage))
                print(f"round {round_} {name:40s} {rates[name][-1]:7.2f} steps/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print("\n1 ms per sample, W = 2, batch 32, MLP, median steps/s:")
    for name, rate in medians.items():
        print(f"  {name:40s} {rate:7.2f}")
    return {"steps_per_s": rates, "median": medians}
