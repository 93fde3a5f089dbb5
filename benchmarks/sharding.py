"""Memory and speed of TrainConfig.shard 'none', 'optimizer' and 'full' at W = 2 and 4, beside
PyTorch FSDP2 run by torchrun (gloo, benchmarks/fsdp2_torchrun.py) on the same model, global
batch, data and Adam (scripts/bench.py --memory).

The model: 8 blocks of Linear(2048, 2048) + GELU, 33.6 M parameters (134 MB in float32; Adam's
training state, parameters + gradient + two moments, 537 MB). Peak memory is each replica's
peak RSS above its own RSS before the model (an idle replica's); steps/s leave out the first
step (its allocations and the optimizer's state) where the peer's timing can (torchrun), and
count it for raytorch (its loop's wall time), which only makes raytorch look slower."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

WIDTH, BLOCKS, BATCH = 2048, 8, 16
PARAMETERS = BLOCKS * (WIDTH * WIDTH + WIDTH)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU()) for _ in range(BLOCKS)])


def data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * BATCH, WIDTH, generator=g)
    return x, torch.tanh(x)


def dataset(steps: int):
    return torch.utils.data.TensorDataset(*data(steps))


def raytorch_run(shard: str, workers: int, steps: int) -> dict:
    from raytorch import TrainConfig, Trainer

    config = TrainConfig(workers=workers, cpus_per_replica=(os.cpu_count() or 2) / workers, shard=shard, epochs=1,
                         batch_size=BATCH, optimizer="adam", lr=1e-4, lr_schedule="constant", shuffle=False,
                         split="even")
    result = Trainer(config, model_fn=model, loss_fn=nn.functional.mse_loss, dataset_fn=lambda: dataset(steps),
                     quiet=True).fit()
    return {"steps_per_s": result.steps / result.wall_time_s,
            "peak_above_idle": [m["peak_above_baseline"] for m in result.replica_memory],
            "held": [m["params"] + m["grad"] + m["optimizer"] for m in result.replica_memory]}


def torchrun(workers: int, steps: int, port: int) -> dict:
    script = Path(__file__).parent / "fsdp2_torchrun.py"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                           str(workers), "--master_addr", "127.0.0.1", "--master_port", str(port), str(script),
                           "--steps", str(steps)], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"torchrun failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(steps: int = 8) -> dict:
    figures: dict = {"parameters": PARAMETERS, "parameter_bytes": PARAMETERS * 4, "steps": steps, "runs": []}
    for workers in (2, 4):
        for system in ("none", "optimizer", "full", "torchrun FSDP2"):
            run = (torchrun(workers, steps, 29500 + workers) if system == "torchrun FSDP2"
                   else raytorch_run(system, workers, steps))
            run.update(system=system, workers=workers)
            figures["runs"].append(run)
            peak = max(run["peak_above_idle"])
            print(f"W={workers} {system:15s} {run['steps_per_s']:6.2f} steps/s, largest peak above idle "
                  f"{peak / 2**20:7.0f} MiB = {peak / figures['parameter_bytes']:4.1f}x the parameters", flush=True)
    return figures
