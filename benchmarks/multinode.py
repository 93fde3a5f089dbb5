"""Several nodes on loopback (scripts/bench.py --multinode): the gradient wires against Ray Train.

A ray.cluster_utils.Cluster on 127.0.0.1 in this process: a head with no CPU (it runs the driver,
as in cluster.yaml) and 4 nodes of 1 CPU, so 4 replicas run one per node and every gradient byte
between them crosses nodes (Ray's object manager, or gloo's TCP connections). The 17 MB-gradient
MLP, global batch 16, SGD; raytorch over the object-store wire and the collective (gloo) wire
(gradients as computed, and in bfloat16: --grad-dtype bf16), and Ray Train (TorchTrainer + DDP
over gloo) on the same cluster. Prints one JSON line.

    RAY_TMPDIR=/tmp/rt-bench python benchmarks/multinode.py --rounds 2
"""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: every node on 127.0.0.1

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "src")]

import ray  # noqa: E402

import systems  # noqa: E402
from raytorch.group.cluster import loopback_cluster  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

NODES = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    assert os.environ.get("RAY_TMPDIR"), "set RAY_TMPDIR to a fresh directory"
    cluster = loopback_cluster(NODES, cpus_per_node=1)
    try:
        paths = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT / "src")])
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": paths}})
        workload = WORKLOADS["17mb"]
        runs = {
            "raytorch object_store": lambda _: systems.raytorch(workload, NODES, "object_store"),
            "raytorch collective": lambda _: systems.raytorch(workload, NODES, "collective"),
            "raytorch collective bf16": lambda _: systems.raytorch(workload, NODES, "collective", "bf16"),
            "ray train": lambda storage: systems.ray_train(workload, NODES, storage),
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        with tempfile.TemporaryDirectory() as storage:
            for round_ in range(args.rounds):
                for name, run in runs.items():
                    rates[name].append(workload.steps / run(storage)["seconds"])
                    print(f"round {round_} {name:24s} {rates[name][-1]:7.2f} steps/s", file=sys.stderr, flush=True)
        medians = {name: statistics.median(values) for name, values in rates.items()}
        print(json.dumps({"nodes": NODES, "workload": "17mb", "steps_per_s": rates, "median": medians}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
