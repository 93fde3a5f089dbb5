"""The all-reduce alone, and what it does to a step as replicas are added (scripts/bench.py --allreduce).

1. Seconds per all-reduce of one flat fp32 gradient across W replicas on one node, three ways:
   - all-to-all: every replica reads every peer's whole gradient from shared memory and sums them
     (the shared-memory wire before reduce-scatter; still how the object-store wire works);
   - reduce-scatter + all-gather: the shared-memory wire now (wire.SharedMemoryWire.all_reduce);
   - gloo: torch.distributed's all_reduce (what DDP and Ray Train use on CPUs).
   Each way includes handing the gradient over (publishing it, or copying it into gloo's buffer).
   Replicas are Ray actors with 2/W CPUs each, so W = 8 fits on two cores: the figures are the
   cost of the traffic on shared cores, not of a network.
2. A step of raytorch itself at W = 2 and W = 8: a 4096 x 4096 linear layer (67 MB of gradient),
   SGD, global batch 8, the same machine: how step time grows with W.
"""

from __future__ import annotations

import socket
import statistics
import time
from datetime import timedelta

import numpy as np
import ray
import torch

from raytorch.core.reduce import batch_weights
from raytorch.wire.shared_memory import SharedMemoryWire, sum_whole

WAYS = ("all_to_all", "reduce_scatter", "gloo")


@ray.remote
class Peer:
    """One replica's side of the all-reduce: a gradient, a shared-memory wire, a gloo group."""

    def __init__(self, position: int, world: int, numel: int):
        torch.set_num_threads(1)
        self.position, self.world = position, world
        self.grad = torch.randn(numel, generator=torch.Generator().manual_seed(position))
        self.out = torch.empty(numel)
        self.wire = None

    def share(self, prefix: str) -> list[str]:
        self.wire = SharedMemoryWire(self.position, len(self.grad), np.float32, prefix, world=self.world)
        return self.wire.paths

    def attach(self, paths: dict[int, list[str]]) -> None:
        self.wire.attach(paths, {})

    def unlink(self) -> None:
        self.wire.unlink()

    def join_gloo(self, port: int) -> None:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=self.position,
                                             world_size=self.world, timeout=timedelta(seconds=120))

    def run(self, way: str, steps: int, first_step: int) -> float:
        """Seconds per all-reduce over `steps` all-reduces (wire steps from `first_step` on)."""
        weights = batch_weights([1] * self.world)
        started = time.perf_counter()
        for step in range(first_step, first_step + steps):
            if way == "gloo":
                self.out.copy_(self.grad)
                torch.distributed.all_reduce(self.out)
                continue
            self.wire.publish(self.grad, step, 0.0)
            tokens = [(rank, step) for rank in range(self.world)]
            if way == "all_to_all":
                sum_whole(self.wire, tokens, weights, self.out)
            else:
                self.wire.all_reduce(tokens, weights, weights, self.out)
            self.wire.applied(step)
        return (time.perf_counter() - started) / steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_seconds(megabytes: float, world: int, rounds: int) -> dict[str, float]:
    """Median over `rounds` of the slowest replica's seconds per all-reduce, for each way."""
    numel = int(megabytes * 1e6 / 4)
    steps = max(2, int(200 / megabytes))  # ~200 MB through each way per round
    peers = [Peer.options(num_cpus=2 / world).remote(p, world, numel) for p in range(world)]
    paths = ray.get([p.share.remote(f"raytorch-bench-{time.time_ns()}") for p in peers])
    ray.get([p.attach.remote(dict(enumerate(paths))) for p in peers])
    ray.get([p.unlink.remote() for p in peers])
    port = free_port()
    ray.get([p.join_gloo.remote(port) for p in peers])
    figures, step = {way: [] for way in WAYS}, 0
    for _ in range(rounds + 1):  # the first round warms up
        for way in WAYS:
            figures[way].append(max(ray.get([p.run.remote(way, steps, step) for p in peers])))
            step += steps if way != "gloo" else 0
    for peer in peers:
        ray.kill(peer)
    return {way: statistics.median(seconds[1:]) for way, seconds in figures.items()}


def linear_4096() -> torch.nn.Module:
    return torch.nn.Linear(4096, 4096)


def step_seconds(world: int, steps: int = 24) -> float:
    """Seconds per step of raytorch on the 4096 x 4096 linear layer at W = `world` (epoch 1 of 2)."""
    from raytorch import TrainConfig, Trainer
    from raytorch.data.datasets import ArrayDataset

    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(8 * steps, 4096)).astype(np.float32),
                        rng.normal(size=(8 * steps, 4096)).astype(np.float32))
    config = TrainConfig(workers=world, cpus_per_replica=2 / world, epochs=2, batch_size=8, lr=1e-3,
                         optimizer="sgd", shuffle=False, split="even", reduction="shared_memory")
    result = Trainer(config, model_fn=linear_4096, dataset_fn=lambda: data,
                     loss_fn=torch.nn.functional.mse_loss, quiet=True).fit()
    return result.epoch_times_s[1] / steps


def main(rounds: int) -> dict:
    table = {}
    for megabytes in (7.4, 100.0):
        for world in (2, 4, 8):
            table[f"{megabytes:g} MB, W={world}"] = figures = all_reduce_seconds(megabytes, world, rounds)
            print(f"{megabytes:6.1f} MB  W={world}  " + "  ".join(f"{way} {figures[way] * 1e3:8.1f} ms"
                                                               for way in WAYS), flush=True)
    rounds_s: dict[int, list[float]] = {2: [], 8: []}
    for _ in range(max(2, rounds)):  # alternating, so drift hits both alike
        for world in rounds_s:
            rounds_s[world].append(step_seconds(world))
    steps = {world: statistics.median(values) for world, values in rounds_s.items()}
    print(f"raytorch step, 4096x4096 linear, SGD, batch 8: W=2 {steps[2] * 1e3:.0f} ms, W=8 {steps[8] * 1e3:.0f} ms "
          f"({steps[8] / steps[2]:.2f}x; rounds {rounds_s})", flush=True)
    return {"all_reduce_s": table, "step_s": steps, "w8_over_w2": steps[8] / steps[2]}
