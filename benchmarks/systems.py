"""One function per system: train a workload for warm-up + measured steps; return what was measured.

Every system: same model, data order, global batch, optimizer (SGD), 1 torch thread per worker.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from workloads import WORKLOADS, Workload, batches


def single(workload: Workload, threads: int) -> dict:
    """Plain single-process PyTorch."""
    torch.set_num_threads(threads)
    x, y = batches(workload, 2 * workload.steps)
    torch.manual_seed(0)
    model = workload.model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=workload.lr)
    b = workload.batch_size
    for k in range(2 * workload.steps):
        if k == workload.steps:
            started = time.perf_counter()
        opt.zero_grad()
        workload.loss_fn(model(x[k * b:(k + 1) * b]), y[k * b:(k + 1) * b]).backward()
        opt.step()
    return {"seconds": time.perf_counter() - started}


def _ddp_worker(rank: int, name: str, workers: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
    workload = WORKLOADS[name]
    x, y = batches(workload, 2 * workload.steps)
    torch.manual_seed(0)
    model = DistributedDataParallel(workload.model_fn())
    opt = torch.optim.SGD(model.parameters(), lr=workload.lr)
    b, part = workload.batch_size, workload.batch_size // workers
    for k in range(2 * workload.steps):
        if k == workload.steps:
            dist.barrier()
            started = time.perf_counter()
        lo = k * b + rank * part
        opt.zero_grad()
        workload.loss_fn(model(x[lo:lo + part]), y[lo:lo + part]).backward()
        opt.step()
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"seconds": time.perf_counter() - started}, f)
    dist.destroy_process_group()


def ddp(workload: Workload, workers: int) -> dict:
    """Plain PyTorch DDP over gloo on 127.0.0.1, one process per worker, no Ray."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        mp.spawn(_ddp_worker, args=(workload.name, workers, port, out), nprocs=workers)
        with open(out) as f:
            return json.load(f)


def _ray_train_loop(config: dict) -> None:
    import ray.train
    from ray.train.torch import prepare_model

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    workload = WORKLOADS[config["workload"]]
    x, y = batches(workload, 2 * workload.steps)
    torch.manual_seed(0)
    model = prepare_model((config.get("model_fn") or workload.model_fn)())
    opt = torch.optim.SGD(model.parameters(), lr=workload.lr)
    b, part = workload.batch_size, workload.batch_size // workers
    first = None
    for k in range(2 * workload.steps):
        if k == workload.steps:
            torch.distributed.barrier()
            started = time.perf_counter()
        lo = k * b + rank * part
        opt.zero_grad()
        workload.loss_fn(model(x[lo:lo + part]), y[lo:lo + part]).backward()
        opt.step()
        if first is None:
            first = time.time()
    torch.distributed.barrier()
    if rank == 0:  # Ray Train V2 keeps metrics only with a checkpoint: hand them over in a file
        with open(config["out"], "w") as f:
            json.dump({"seconds": time.perf_counter() - started, "first_step_at": first}, f)


def ray_train(workload: Workload, workers: int, storage: str, model_fn=None) -> dict:
    """Ray Train's TorchTrainer + prepare_model (DDP over gloo), Ray already up. `model_fn`
    replaces the workload's model factory (the straggler case pins processes through it)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.path.join(storage, f"ray-train-{time.time_ns()}.json")
    trainer = TorchTrainer(_ray_train_loop, train_loop_config={"workload": workload.name, "out": out,
                                                               "model_fn": model_fn},
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
                           run_config=RunConfig(storage_path=storage, name=f"bench-{workload.name}-{time.time_ns()}"))
    called = time.time()
    trainer.fit()
    with open(out) as f:
        metrics = json.load(f)
    return {"seconds": metrics["seconds"], "first_step_s": metrics["first_step_at"] - called}


def raytorch(workload: Workload, workers: int, reduction: str, grad_dtype: str = "fp32") -> dict:
    """raytorch: epoch 0 is the warm-up, epoch 1 is measured (the same steps again)."""
    from raytorch import TrainConfig, Trainer

    config = TrainConfig(workers=workers, epochs=2, batch_size=workload.batch_size, lr=workload.lr,
                         optimizer="sgd", lr_schedule="constant", shuffle=False, reduction=reduction,
                         grad_dtype=grad_dtype)
    result = Trainer(config, model_fn=workload.model_fn, loss_fn=workload.loss_fn,
                     dataset_fn=lambda: workload.data_fn(workload.steps * workload.batch_size), quiet=True).fit()
    return {"seconds": result.epoch_times_s[1], "first_step_s": result.time_to_first_step_s}
