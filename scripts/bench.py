#!/usr/bin/env python3
"""raytorch against plain PyTorch, DDP and Ray Train, on this machine, in one run.

    python scripts/bench.py                        # all workloads, W=2, 3 alternating rounds
    python scripts/bench.py --workloads mlp --rounds 1 --json bench.json
    python scripts/bench.py --allreduce            # the all-reduce alone, W = 2, 4, 8 (benchmarks/allreduce.py)
    python scripts/bench.py --dropout              # what placing dropout per sample costs a step
    python scripts/bench.py --memory --json docs/bench-sharding.json   # shard none/optimizer/full vs FSDP2

Ray Train needs the `bench` extra (pip install -e '.[bench]'); without it that column is skipped.
Same model, data order, global batch and SGD everywhere; every distributed worker gets 1 torch
thread; each system runs as many warm-up steps as it then measures. Systems alternate within a
round so drift hits all alike; the table shows medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "src")]

import systems  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workloads", default="linear,mlp,25m", help=f"comma-separated of {', '.join(WORKLOADS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=5000, help="steps of the memory check (0: skip)")
    parser.add_argument("--json", default="bench.json", help="where to write the raw figures")
    parser.add_argument("--straggler", action="store_true",
                        help="only the straggler case: W=2, one replica's core shared with a busy loop; raytorch even "
                             "vs --split adaptive vs Ray Train (needs 2 cores)")
    parser.add_argument("--allreduce", action="store_true",
                        help="only the all-reduce: seconds per all-reduce of 7.4 MB and 100 MB at W = 2, 4, 8 "
                             "(all-to-all vs reduce-scatter + all-gather vs gloo), and a raytorch step at W = 2 vs 8")
    parser.add_argument("--prefetch", action="store_true",
                        help="only the input pipeline: a dataset waiting 1 ms per sample, W=2, batch 32; raytorch "
                             "with and without loader_workers vs Ray Train with DataLoader workers")
    parser.add_argument("--faults", type=int, metavar="RUNS", default=0,
                        help="only faults at random moments: RUNS runs of a small job, each with one replica "
                             "SIGKILLed or SIGSTOPped at a random moment, against the same job undisturbed "
                             "(benchmarks/faults.py)")
    parser.add_argument("--dropout", action="store_true",
                        help="only dropout placed per sample: ms per forward and backward with torch's dropout vs "
                             "within raytorch.seeded_forward, an MLP and a transformer, one process "
                             "(benchmarks/dropout.py)")
    parser.add_argument("--memory", action="store_true",
                        help="only sharding: peak memory per replica and steps/s of shard none, optimizer, full at "
                             "W = 2 and 4 (a 33.6 M-parameter model, Adam) beside PyTorch FSDP2 run by torchrun "
                             "(benchmarks/sharding.py)")
    parser.add_argument("--multinode", action="store_true",
                        help="only the multi-node case: a loopback cluster of 4 one-CPU nodes, 4 replicas, raytorch's "
                             "object-store and collective wires (fp32 and bf16 gradients) vs Ray Train "
                             "(benchmarks/multinode.py)")
    args = parser.parse_args()
    if args.dropout:  # one process, no Ray
        import dropout

        save({"dropout": dropout.main(args.rounds)}, args.json)
        return 0
    if args.multinode:  # a cluster of its own, in a process of its own: this one holds no Ray
        return multinode(args.rounds, args.json)
    from raytorch.group.cluster import keep_on_loopback

    keep_on_loopback()
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path[:2])}})
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    if args.memory:
        import sharding

        save({"sharding": sharding.main()}, args.json)
        ray.shutdown()
        return 0
    if args.allreduce:
        import allreduce

        save({"allreduce": allreduce.main(args.rounds)}, args.json)
        ray.shutdown()
        return 0
    if args.faults:
        import faults

        figures = faults.main(args.faults, seed=0)
        save({"faults": figures}, args.json)
        ray.shutdown()
        print(f"\n{figures['survived']}/{len(figures['runs'])} runs finished, {figures['faulted']} of them after a "
              f"replica loss; largest parameter difference from the undisturbed run {figures['max_rel_param_diff']}; "
              f"recovery {figures['recovery_s_median']} s median, {figures['recovery_s_max']} s at most")
        return 0
    if args.prefetch:
        import prefetch

        save({"prefetch": prefetch.main(args.rounds)}, args.json)
        ray.shutdown()
        return 0
    if args.straggler:
        import straggler

        if not straggler.available():
            print("the straggler case needs cores 0 and 1 and sched_setaffinity", file=sys.stderr)
            return 1
        figures = straggler.main(args.rounds)
        ray.shutdown()
        save({"straggler": figures}, args.json)
        rates = figures["steps_per_s"]
        print("\nstraggler (MLP, W=2, one replica's core shared with a busy loop), median steps/s:")
        for system, rate in rates.items():
            print(f"  {system:18s} {rate:7.1f}")
        print(f"  adaptive / even {figures['adaptive_vs_even']:.2f}x, adaptive / Ray Train "
              f"{figures['adaptive_vs_ray_train']:.2f}x; final parameters adaptive vs even: max rel. diff "
              f"{figures['adaptive_vs_even_max_rel_param_diff']:.1e}")
        return 0
    runs = make_runs(args.workers)
    raw: dict = {"workers": args.workers, "cores": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as storage:
        for round_ in range(args.rounds):
            for name in args.workloads.split(","):
                workload = WORKLOADS[name]
                for system, run in runs.items():
                    figures = run(workload, storage)
                    figures.update(system=system, workload=name, round=round_,
                                   steps_per_s=workload.steps / figures["seconds"],
                                   samples_per_s=workload.steps * workload.batch_size / figures["seconds"])
                    raw["runs"].append(figures)
                    save(raw, args.json)  # after every run: an interrupted benchmark keeps what it measured
                    print(f"round {round_} {name:7s} {system:26s} {figures['steps_per_s']:9.1f} steps/s", flush=True)
    if args.memory_steps:
        raw["memory"] = memory_check(args.workers, args.memory_steps)
    ray.shutdown()
    save(raw, args.json)
    print_table(raw, args.workloads.split(","))
    print(f"\nraw figures: {args.json}")
    return 0


def multinode(rounds: int, path: str) -> int:
    with tempfile.TemporaryDirectory(prefix="rt-") as ray_tmp:
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multinode.py"), "--rounds", str(rounds)],
                              env={**os.environ, "RAY_TMPDIR": ray_tmp}, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        return done.returncode
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    save({"multinode": figures}, path)
    median = figures["median"]
    print("\nloopback cluster, 4 nodes of 1 CPU, 4 replicas, 17 MB gradient, median steps/s:")
    for system, rate in median.items():
        print(f"  {system:24s} {rate:7.2f}")
    collective = median["raytorch collective"]
    print(f"  collective / object store {collective / median['raytorch object_store']:.2f}x, "
          f"collective / Ray Train {collective / median['ray train']:.2f}x, "
          f"bf16 gradients / fp32 {median['raytorch collective bf16'] / collective:.2f}x")
    return 0


def save(raw: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(raw, indent=1))


def make_runs(workers: int) -> dict:
    runs = {
        "pytorch 1 thread": lambda w, _: systems.single(w, threads=1),
        f"pytorch {os.cpu_count()} threads": lambda w, _: systems.single(w, threads=os.cpu_count()),
        f"ddp gloo W={workers}": lambda w, _: systems.ddp(w, workers),
    }
    try:
        import ray.train.torch  # noqa: F401

        runs[f"ray train W={workers}"] = lambda w, storage: systems.ray_train(w, workers, storage)
    except ImportError:
        print("Ray Train is not installed (pip install -e '.[bench]'): skipping it", flush=True)
    for reduction in ("shared_memory", "object_store"):
        runs[f"raytorch {reduction} W={workers}"] = lambda w, _, r=reduction: systems.raytorch(w, workers, r)
    return runs


def memory_check(workers: int, steps: int) -> dict:
    """Driver RSS and object-store use around long runs; each replica's memory against its budget."""
    from raytorch import TrainConfig, Trainer
    from workloads import WORKLOADS as W

    report = {}
    for workload, reduction in [(W["linear"], "shared_memory"), (W["linear"], "object_store"),
                                (W["25m"], "shared_memory"), (W["25m"], "object_store")]:
        n = steps if workload.name == "linear" else 24
        config = TrainConfig(workers=workers, epochs=1, batch_size=workload.batch_size, lr=workload.lr,
                             optimizer="adam", lr_schedule="constant", reduction=reduction)
        before = (rss(), plasma_bytes())
        result = Trainer(config, model_fn=workload.model_fn, loss_fn=workload.loss_fn,
                         dataset_fn=lambda: workload.data_fn(n * workload.batch_size), quiet=True).fit()
        after = (rss(), plasma_bytes())
        report[f"{workload.name} {reduction}"] = {
            "steps": result.steps, "driver_rss_growth": after[0] - before[0],
            "object_store_before": before[1], "object_store_after": after[1], "replicas": result.replica_memory}
    return report


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def plasma_bytes() -> int:
    """Bytes in Ray's object store on this node, as `ray memory --stats-only` reports them."""
    from ray._private.internal_api import memory_summary

    time.sleep(1.0)  # freed objects are reported with a short delay
    found = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return int(found.group(1)) * 2**20 if found else -1


def print_table(raw: dict, names: list[str]) -> None:
    mib = 2**20
    for name in names:
        rows = {}
        for run in raw["runs"]:
            if run["workload"] == name:
                rows.setdefault(run["system"], []).append(run)
        medians = {s: statistics.median(r["steps_per_s"] for r in rs) for s, rs in rows.items()}
        anchors = {s: v for s, v in medians.items() if s.startswith(("ddp", "ray train"))}
        w = WORKLOADS[name]
        print(f"\n{name}: {w.params():,} parameters, global batch {w.batch_size}, {w.steps} measured steps "
              f"(median of {len(next(iter(rows.values())))})")
        header = f"{'system':30s} {'steps/s':>9s} {'samples/s':>10s}" + "".join(f" {'x ' + a:>18s}" for a in anchors)
        print(header + f" {'first step s':>13s}")
        for system, value in medians.items():
            ratios = "".join(f" {value / a:18.2f}" for a in anchors.values())
            firsts = [r["first_step_s"] for r in rows[system] if "first_step_s" in r]
            first = f"{statistics.median(firsts):13.2f}" if firsts else f"{'':13s}"
            print(f"{system:30s} {value:9.1f} {value * w.batch_size:10.0f}{ratios} {first}")
    for label, m in raw.get("memory", {}).items():
        print(f"\nmemory, {label}, {m['steps']} steps: driver RSS grew {m['driver_rss_growth'] / mib:.1f} MiB; "
              f"object store {m['object_store_before'] / mib:.0f} -> {m['object_store_after'] / mib:.0f} MiB")
        for rank, r in enumerate(m["replicas"]):
            budget = r["params"] + r["grad"] + r["optimizer"] + 2 * r["grad"]
            print(f"  replica {rank}: params {r['params'] / mib:.1f} + grad {r['grad'] / mib:.1f} + optimizer "
                  f"{r['optimizer'] / mib:.1f} + wire {r['wire_buffers'] / mib:.1f} MiB; measured PSS above "
                  f"baseline {r['pss_above_baseline'] / mib:.1f} MiB (budget {budget / mib:.1f})")


if __name__ == "__main__":
    sys.exit(main())
