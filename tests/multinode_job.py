"""A multi-node Ray cluster on 127.0.0.1 in this one process, and raytorch training runs on it.

Run by tests/test_multinode.py in a subprocess: the test session holds its own Ray, and one process
holds one Ray connection. Set RAY_TMPDIR to a fresh, short directory: the nodes' sessions and the
cluster-address file then stay out of /tmp/ray, where other Rays of this machine live.

    RAY_TMPDIR=/tmp/rt-x python tests/multinode_job.py --nodes 3 --cpus-per-node 2 --workers 3 --placement spread

Prints, per placement, one JSON line: the nodes the replicas ran on (from the driver's own
"replica-r: ..., node ..." lines), the gradient wire, the trained parameters and the epoch losses.

With --node-loss: one node per worker plus one spare, a run of two replicas spread over the
nodes; the node holding replica-1 is removed mid-run (held at a gate, see faults.Gated), and the
replica is replaced on the spare node. (A node lost with none to replace on: --elastic.)

With --elastic: two nodes of one CPU and an elastic run (workers 2, max_workers 3) paced to last
~10 s; a third node is added once it trains, the run takes a replica in on it, then the node of
replica-1 is removed and the run goes on with two.

With --drain: three nodes of one CPU, two replicas spread over them; once the run trains, the node
of replica-1 is marked draining (Ray's drain API, as a spot preemption does), its replica is moved
to the free node, and then the drained node is removed: nothing lost, nothing redone.

With --all (what the tests run): each of the above in turn on one cluster, its worker nodes
reshaped for each (the nodes of the right size that the last one left are kept), each JSON line
naming its scenario (placement, node-loss, drain, elastic).
"""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: every node on 127.0.0.1

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import ray
import torch.nn.functional as F
from ray.cluster_utils import Cluster

from faults import Gated, paced
from polling import wait_for
from raytorch import TrainConfig, Trainer
from raytorch.group.cluster import loopback_cluster
from raytorch.tasks.builtin import linear, linear_data

# The one job, shared with the test that checks it against plain PyTorch.
JOB = dict(epochs=3, batch_size=32, lr=1e-4, optimizer="sgd", seed=7)
DATA = partial(linear_data, 130, 7)
MODEL = partial(linear, 1, 1)
LOSS = F.mse_loss

REPLICA_1 = re.compile(r"^replica-1: \S+, node (\w+), pid \d+", re.M)
REPLICA_LINE = re.compile(r"^replica-(\d+): \S+, node (\w+), pid \d+, gradients via (\w+)$", re.M)


class Tee(io.StringIO):
    """Keeps what is printed and passes it on, so the run's console still shows in the test's output."""

    def write(self, text):
        sys.__stderr__.write(text)
        return super().write(text)


def train(workers: int, placement: str) -> dict:
    config = TrainConfig(workers=workers, placement=placement, reduction="auto", **JOB)
    console = Tee()
    with contextlib.redirect_stdout(console):
        result = Trainer(config, model_fn=MODEL, dataset_fn=DATA, loss_fn=LOSS).fit()
    replicas = REPLICA_LINE.findall(console.getvalue())
    return {
        "placement": placement,
        "replica_nodes": [node for _, node, _ in sorted(replicas, key=lambda r: int(r[0]))],
        "wires": sorted({wire for _, _, wire in replicas}),
        "params": {name: p.detach().flatten().tolist() for name, p in result.model.named_parameters()},
        "epoch_losses": result.epoch_losses,
        "digests": sorted(set(result.replica_digests)),
    }


def train_losing_a_node(cluster: Cluster, replace_timeout: float) -> dict:
    """Two replicas spread over the nodes; the node of replica-1 is removed once both are held at
    the gate (at their 8th step: epoch 1)."""
    gate = Path(tempfile.mkdtemp(prefix="gate-"))
    (gate / "hold").touch()

    def remove_node():
        wait_for(lambda: len(list(gate.glob("reached-*"))) >= 2, "both replicas at the gate")
        node = REPLICA_1.search(console.getvalue()).group(1)  # the driver's own line for replica-1
        [doomed] = [n for n in cluster.worker_nodes if n.node_id.startswith(node)]
        removed.append(node)
        cluster.remove_node(doomed)
        (gate / "hold").unlink()

    removed: list[str] = []
    console = Tee()
    config = TrainConfig(workers=2, placement="spread", replace_timeout=replace_timeout, **JOB)
    with contextlib.redirect_stdout(console):
        remover = threading.Thread(target=remove_node, daemon=True)
        remover.start()
        result = Trainer(config, model_fn=partial(Gated, str(gate), 8), dataset_fn=DATA, loss_fn=LOSS).fit()
        remover.join()
    replicas = REPLICA_LINE.findall(console.getvalue())
    return {
        "replace_timeout": replace_timeout,
        "removed_node": removed[0],
        "replica_nodes": [node for _, node, _ in sorted(replicas, key=lambda r: int(r[0]))],
        "restarts": result.restarts,
        "params": {name: p.detach().flatten().tolist() for name, p in result.model.named_parameters()},
        "epoch_losses": result.epoch_losses,
        "digests": sorted(set(result.replica_digests)),
    }


ELASTIC_JOB = dict(JOB, epochs=16)  # 80 steps, ~0.15 s each while paced: room to grow, then to shrink


def paced_fit(config: TrainConfig, console: Tee, change):
    """Fit `config` on the paced model (~0.15 s a step) in a thread, with stdout in `console`,
    while change() acts on the cluster in this, the main thread (adding a node registers signal
    handlers, which only the main thread may); once change() is done, the run goes on unpaced."""
    pace = Path(tempfile.mkdtemp(prefix="pace-"))
    (pace / "on").touch()
    model_fn = partial(paced, MODEL, str(pace), 0.01)
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = Trainer(config, model_fn=model_fn, dataset_fn=DATA, loss_fn=LOSS).fit()
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            outcome["error"] = e

    with contextlib.redirect_stdout(console):
        trainer = threading.Thread(target=fit, daemon=True)
        trainer.start()
        try:
            change()
        finally:
            (pace / "on").unlink()
        trainer.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run_record(result, console: Tee, events: list[str]) -> dict:
    return {
        "events": events,
        "console": console.getvalue(),
        "restarts": result.restarts,
        "params": {name: p.detach().flatten().tolist() for name, p in result.model.named_parameters()},
        "epoch_losses": result.epoch_losses,
        "digests": sorted(set(result.replica_digests)),
        "workers_at_end": len(result.replica_digests),
        "steps_redone": result.steps_redone,
    }


def train_draining(cluster: Cluster) -> dict:
    """Two replicas on three one-CPU nodes; replica-1's node is drained (a preemption notice), then removed."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    events: list[str] = []

    def drain_then_remove():
        wait_for(lambda: "Epoch 0:" in console.getvalue(), "the run to train")
        node = REPLICA_1.search(console.getvalue()).group(1)
        [doomed] = [n for n in cluster.worker_nodes if n.node_id.startswith(node)]
        accepted, why = GcsClient(address=cluster.address).drain_node(
            doomed.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot notice",
            int(time.time() * 1000) + 60_000)
        assert accepted, why
        events.append("node draining")
        wait_for(lambda: "moved replica-1 off a draining node" in console.getvalue(), "the move")
        cluster.remove_node(doomed)
        events.append("node removed")

    console = Tee()
    config = TrainConfig(workers=2, placement="spread", **ELASTIC_JOB)
    return run_record(paced_fit(config, console, drain_then_remove), console, events)


def train_elastic(cluster: Cluster) -> dict:
    """An elastic run on two one-CPU nodes: a node added (it grows to 3), then one removed (back to 2)."""
    events: list[str] = []

    def add_then_remove():
        wait_for(lambda: "Epoch 0:" in console.getvalue(), "the run to train")
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        events.append("node added")
        wait_for(lambda: " joined (room appeared)" in console.getvalue(), "a replica to join")
        node = REPLICA_1.search(console.getvalue()).group(1)
        [doomed] = [n for n in cluster.worker_nodes if n.node_id.startswith(node)]
        cluster.remove_node(doomed)
        events.append("node removed")

    console = Tee()
    config = TrainConfig(workers=2, min_workers=1, max_workers=3, placement="spread", replace_timeout=3.0,
                         **ELASTIC_JOB)
    return run_record(paced_fit(config, console, add_then_remove), console, events)


def train_placements(cluster: Cluster, workers: int, placements: list[str]) -> list[dict]:
    nodes, total = list(cluster.worker_nodes), ray.cluster_resources().get("CPU", 0)
    records = []
    for placement in placements:
        # the previous run's replicas and reservation are released asynchronously: a placement
        # decided while they still hold CPUs would not show the strategy
        wait_for(lambda: ray.available_resources().get("CPU", 0) >= total, "all CPUs free again")
        record = train(workers, placement)
        record["head_node"] = cluster.head_node.node_id[:12]
        record["worker_nodes"] = sorted(n.node_id[:12] for n in nodes)
        records.append(record)
    return records


def train_losing_nodes(cluster: Cluster) -> list[dict]:
    """A node lost with a spare node to replace on (a lost node with none to replace on: the
    elastic scenario's, which goes on with fewer)."""
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, "two CPUs free")
    return [train_losing_a_node(cluster, 60.0)]


def reshape(cluster: Cluster, nodes: int, cpus_per_node: int) -> None:
    """The cluster's worker nodes made `nodes` of `cpus_per_node` CPUs, all free: the nodes of that
    size that the last scenario left are kept (a node costs seconds to start), the others removed,
    the rest added."""
    cpus = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
    kept = [node for node in cluster.worker_nodes if cpus.get(node.node_id) == cpus_per_node][:nodes]
    for node in [node for node in cluster.worker_nodes if node not in kept]:
        cluster.remove_node(node)
    for _ in range(nodes - len(kept)):
        cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    wanted = {node.node_id for node in cluster.worker_nodes}
    wait_for(lambda: {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")} == wanted
             and ray.available_resources().get("CPU", 0) == nodes * cpus_per_node, "the nodes, all free")


# --all: (scenario, worker nodes, CPUs a node, its runs), one after another on one cluster
SCENARIOS = [
    ("placement", 3, 2, lambda cluster: train_placements(cluster, 3, ["spread", "pack"])),
    ("node-loss", 3, 1, train_losing_nodes),
    ("drain", 3, 1, lambda cluster: [train_draining(cluster)]),
    ("elastic", 2, 1, lambda cluster: [train_elastic(cluster)]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--placement", action="append", choices=["pack", "spread"])
    parser.add_argument("--node-loss", action="store_true")
    parser.add_argument("--elastic", action="store_true")
    parser.add_argument("--drain", action="store_true")
    parser.add_argument("--all", action="store_true")
    args = parser.parse_args()
    assert os.environ.get("RAY_TMPDIR"), "set RAY_TMPDIR to a fresh directory"
    if args.all:
        args.nodes, args.cpus_per_node = SCENARIOS[0][1:3]
    # A head that runs the driver and no replica, as in cluster.yaml; worker nodes as separate raylets.
    cluster = loopback_cluster(args.nodes, args.cpus_per_node)
    try:
        assert cluster.address.startswith("127.0.0.1:"), cluster.address
        ray.init(address=cluster.address, logging_level="WARNING")
        if args.all:
            for k, (scenario, nodes, cpus_per_node, runs) in enumerate(SCENARIOS):
                if k:
                    reshape(cluster, nodes, cpus_per_node)
                for record in runs(cluster):
                    print(json.dumps({"scenario": scenario, **record}), flush=True)
        elif args.drain:
            print(json.dumps(train_draining(cluster)), flush=True)
        elif args.elastic:
            print(json.dumps(train_elastic(cluster)), flush=True)
        elif args.node_loss:
            for record in train_losing_nodes(cluster):
                print(json.dumps(record), flush=True)
        else:
            for record in train_placements(cluster, args.workers, args.placement or ["spread"]):
                print(json.dumps(record), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
