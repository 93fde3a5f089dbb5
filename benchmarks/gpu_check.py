"""The GPU check (run by scripts/gpu_check.sh on a lent GPU machine): correctness, precision and speed
of raytorch replicas on one card, against plain PyTorch on the same card.

    python benchmarks/gpu_check.py --out DIR          # on a GPU: the full check (a few minutes)
    python benchmarks/gpu_check.py --out DIR --dry    # anywhere: the same steps, tiny, on CPU

Prints a table last; writes DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, image_data  # noqa: E402


def plain_steps_per_s(workload, device: str, steps: int, rounds: int = 3) -> float:
    """Plain PyTorch on `device`: SGD steps/s on the workload's batches (warm-up first)."""
    torch.manual_seed(0)
    model = workload.model_fn().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=workload.lr)
    data = workload.data_fn(workload.batch_size * steps)
    x, y = (torch.as_tensor(a).to(device) for a in (data.x, data.y))
    rates = []
    for _ in range(rounds + 1):  # the first round warms up
        sync(device)
        started = time.perf_counter()
        for k in range(steps):
            b = slice(k * workload.batch_size, (k + 1) * workload.batch_size)
            opt.zero_grad()
            workload.loss_fn(model(x[b]), y[b]).backward()
            opt.step()
        sync(device)
        rates.append(steps / (time.perf_counter() - started))
    return statistics.median(rates[1:])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def raytorch_run(workload, device: str, steps: int, workers: int = 1, precision: str = "fp32",
                 gpus: float | None = None, epochs: int = 1, **more):
    from raytorch import TrainConfig, Trainer

    config = TrainConfig(workers=workers, epochs=epochs, batch_size=workload.batch_size, lr=workload.lr,
                         optimizer="sgd", shuffle=False, device=device, precision=precision,
                         gpus_per_replica=gpus if device == "cuda" else None, **more)
    return Trainer(config, model_fn=workload.model_fn,
                   dataset_fn=partial(workload.data_fn, workload.batch_size * steps),
                   loss_fn=workload.loss_fn, quiet=True).fit()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny: checks the script, measures nothing")
    args = parser.parse_args()
    device = "cpu" if args.dry else "cuda"
    if device == "cuda":
        assert torch.cuda.is_available(), "no CUDA here: run with --dry"
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 equality needs real fp32 matmuls
        torch.backends.cudnn.allow_tf32 = False
    scale = 0.05 if args.dry else 1.0
    from raytorch.group.cluster import keep_on_loopback

    keep_on_loopback()
    import ray

    ray.init(num_cpus=4, num_gpus=None if device == "cuda" else 0, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path[:1]])}})
    rows, details = [], {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"}

    # 1. correctness: 2 replicas sharing the card (0.5 GPU each) against one CPU process, fp32
    mlp = WORKLOADS["mlp"]
    steps = max(4, int(40 * scale))
    result = raytorch_run(mlp, device, steps, workers=2, gpus=0.5)
    torch.manual_seed(0)
    reference = mlp.model_fn()
    opt = torch.optim.SGD(reference.parameters(), lr=mlp.lr)
    data = image_data(mlp.batch_size * steps)
    for k in range(steps):
        b = slice(k * mlp.batch_size, (k + 1) * mlp.batch_size)
        opt.zero_grad()
        mlp.loss_fn(reference(torch.as_tensor(data.x[b])), torch.as_tensor(data.y[b])).backward()
        opt.step()
    error = max(((a.detach() - e.detach()).norm() / e.detach().norm()).item()
                for a, e in zip(result.model.parameters(), reference.parameters()))
    rows.append(("fp32, 2 replicas on one card vs CPU", f"rel. error {error:.2e}", "< 1e-4", error < 1e-4))

    # 1b. mixed devices: a GPU replica and a CPU replica, split even vs adaptive, against the same reference
    mixed = "cuda,cpu" if device == "cuda" else "cpu,cpu"
    for split in ("even", "adaptive"):
        run = raytorch_run(mlp, "cpu", steps, workers=2, devices=mixed, split=split, epochs=2, output_dir=str(
            Path(args.out, f"mixed-{split}")), log_every=1)
        rate = steps / run.epoch_times_s[-1]
        records = [json.loads(line) for line in Path(args.out, f"mixed-{split}", "metrics.jsonl").open()]
        cut = [r["split"] for r in records if r.get("event") == "step"][-1]
        details[f"mixed_{split}"] = {"steps_per_s": rate, "last_split": cut, "epoch_losses": run.epoch_losses}
        rows.append((f"{mixed} split {split}", f"{rate:.1f} steps/s, last split {cut}", "runs", True))
    one_epoch = raytorch_run(mlp, "cpu", steps, workers=2, devices=mixed, split="adaptive")
    error = max(((a.detach() - e.detach()).norm() / e.detach().norm()).item()
                for a, e in zip(one_epoch.model.parameters(), reference.parameters()))
    rows.append((f"fp32, {mixed} adaptive vs CPU", f"rel. error {error:.2e}", "< 1e-4", error < 1e-4))

    # 1c. the collective wire: NCCL for a replica holding the whole card (a group of one rank: the
    # gradient never leaves the device), gloo for the cuda + cpu pair (host buffers)
    for label, more in (("collective, 1 whole-GPU replica (NCCL)", {"workers": 1}),
                        (f"collective, {mixed} (gloo)", {"workers": 2, "devices": mixed})):
        run = raytorch_run(mlp, device, steps, reduction="collective", **more)
        error = max(((a.detach() - e.detach()).norm() / e.detach().norm()).item()
                    for a, e in zip(run.model.parameters(), reference.parameters()))
        rows.append((f"fp32, {label} vs CPU", f"rel. error {error:.2e}", "< 1e-4", error < 1e-4))

    # 2. precision: bf16 and fp16 runs converge (loss falls over 3 epochs)
    for precision in ("bf16", "fp16"):
        run = raytorch_run(mlp, device, steps, workers=2, gpus=0.5, precision=precision, epochs=3)
        falls = run.epoch_losses[-1] < run.epoch_losses[0]
        rows.append((f"{precision} converges", " -> ".join(f"{v:.3f}" for v in run.epoch_losses), "falls", falls))
        details[f"{precision}_epoch_losses"] = run.epoch_losses

    # 3. speed: one replica against plain PyTorch on the same card; two replicas sharing it
    for name in ("mlp", "25m"):
        workload = WORKLOADS[name]
        n = max(4, int((200 if name == "mlp" else 40) * scale))
        plain = plain_steps_per_s(workload, device, n)
        one = raytorch_run(workload, device, n, workers=1, epochs=2)
        two = raytorch_run(workload, device, n, workers=2, gpus=0.5, epochs=2)
        ours = n / one.epoch_times_s[-1]  # the second epoch: warm
        shared = n / two.epoch_times_s[-1]
        rows.append((f"{name}: 1 replica vs plain PyTorch", f"{ours:.1f} vs {plain:.1f} steps/s",
                     ">= 0.9x", ours >= 0.9 * plain or args.dry))  # a dry run times nothing worth judging
        rows.append((f"{name}: 2 replicas sharing the card", f"{shared:.1f} steps/s", "runs", True))
        details[name] = {"plain_steps_per_s": plain, "raytorch_1_steps_per_s": ours, "raytorch_2_steps_per_s": shared}

    # 4. shard full (FSDP2 on NCCL, one whole-GPU replica) against none on the same card: the result,
    # the replica's peak allocated memory, steps/s (the second epoch: warm)
    workload, n = WORKLOADS["25m"], max(4, int(40 * scale))
    sharded = {shard: raytorch_run(workload, device, n, workers=1, epochs=2, shard=shard, reduction="collective")
               for shard in ("none", "full")}
    error = max(((a.detach() - e.detach()).norm() / e.detach().norm()).item()
                for a, e in zip(sharded["full"].model.parameters(), sharded["none"].model.parameters()))
    rows.append(("shard full vs none, 25m, 1 replica (NCCL)", f"rel. error {error:.2e}", "< 1e-4", error < 1e-4))
    peak = {shard: run.replica_memory[0].get("peak_gpu", run.replica_memory[0]["peak_above_baseline"])
            for shard, run in sharded.items()}
    rate = {shard: n / run.epoch_times_s[-1] for shard, run in sharded.items()}
    rows.append(("shard full vs none: peak memory, steps/s", f"{peak['full'] / 2**20:.0f} vs {peak['none'] / 2**20:.0f}"
                 f" MiB, {rate['full']:.1f} vs {rate['none']:.1f}", "runs", True))
    details["shard"] = {"peak_bytes": peak, "steps_per_s": rate, "rel_error": error}
    ray.shutdown()

    details["rows"] = [dict(zip(("check", "measured", "target", "ok"), r)) for r in rows]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "gpu_check.json").write_text(json.dumps(details, indent=1))
    print(f"\nGPU check on {details['device']}")
    print(f"| {'check':40s} | {'measured':34s} | {'target':8s} | ok |")
    for check, measured, target, ok in rows:
        print(f"| {check:40s} | {measured:34s} | {target:8s} | {'yes' if ok else 'NO'} |")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
