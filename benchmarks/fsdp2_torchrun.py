"""PyTorch FSDP2 on its own, run by torchrun with gloo: the peer `scripts/bench.py --memory` sets
raytorch's shard modes beside. Same model, global batch, data and Adam as benchmarks/sharding.py.

    GLOO_SOCKET_IFNAME=lo python -m torch.distributed.run --nnodes 1 --nproc_per_node 2 \
        --master_addr 127.0.0.1 --master_port 29511 benchmarks/fsdp2_torchrun.py --steps 8

Rank 0 prints one JSON line: steps/s and each rank's peak RSS above its RSS before the model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from sharding import BATCH, data, model  # noqa: E402


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    import torch._dynamo  # noqa: F401  (as a raytorch replica's baseline: torch.optim imports it)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    idle = status_bytes("VmRSS")
    mesh = init_device_mesh("cpu", (world,))
    net = model()
    for unit in [*net, net]:
        if any(p.requires_grad for p in unit.parameters()):
            fully_shard(unit, mesh=mesh)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    x, y = data(args.steps)
    parts = torch.tensor_split(torch.arange(BATCH), world)
    started = None
    for step in range(args.steps):
        if step == 1:  # the first step warms up (allocations, the optimizer's state)
            dist.barrier()
            started = time.perf_counter()
        idx = parts[rank] + step * BATCH
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x[idx]), y[idx]).backward()
        optimizer.step()
    dist.barrier()
    seconds = time.perf_counter() - started
    peaks = [None] * world
    dist.all_gather_object(peaks, status_bytes("VmHWM") - idle)
    if rank == 0:
        print(json.dumps({"steps_per_s": (args.steps - 1) / seconds, "peak_above_idle": peaks}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
