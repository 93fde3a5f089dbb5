"""Reserving the cluster's resources for all replicas at once, or saying why that cannot happen."""

from __future__ import annotations

import time
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from .errors import ClusterError

# The cluster launcher leaves this file on the head node; its autoscaler can add nodes.
AUTOSCALER_MARKER = Path("~/ray_bootstrap_config.yaml").expanduser()
DEFAULT_WAIT_S = 60.0
DEFAULT_AUTOSCALE_WAIT_S = 600.0


def replicas_that_fit(node_resources: list[dict[str, float]], bundle: dict[str, float]) -> int:
    """How many identical bundles the nodes could hold at most, each bundle on one node."""
    total = 0
    for node in node_resources:
        total += min(int(node.get(name, 0.0) // amount) for name, amount in bundle.items())
    return total


def describe_cluster(node_resources: list[dict[str, float]]) -> str:
    cpus = sum(n.get("CPU", 0.0) for n in node_resources)
    gpus = sum(n.get("GPU", 0.0) for n in node_resources)
    return f"{len(node_resources)} node(s) with {cpus:g} CPU and {gpus:g} GPU in all"


def reserve(workers: int, bundle: dict[str, float], strategy: str, timeout_s: float | None) -> PlacementGroup:
    """A ready placement group of `workers` bundles, or a ClusterError that says what the cluster has.

    Args:
        strategy: 'pack' or 'spread', as Ray's PACK and SPREAD. SPREAD, not STRICT_SPREAD: it puts
            the bundles on distinct nodes where it can and shares nodes where it must, so the same
            room check holds for both, and W replicas need not wait for W nodes.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    autoscaling = AUTOSCALER_MARKER.exists()
    fits = replicas_that_fit(nodes, bundle)
    ask = ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())
    if fits < workers and not autoscaling:
        raise ClusterError(
            f"{workers} replicas of {ask} each cannot fit: the cluster has {describe_cluster(nodes)} "
            f"(room for {fits}); lower --workers or the per-replica resources, or add nodes")
    wait = timeout_s if timeout_s is not None else (DEFAULT_AUTOSCALE_WAIT_S if autoscaling else DEFAULT_WAIT_S)
    group = placement_group([dict(bundle) for _ in range(workers)], strategy=strategy.upper())
    started = time.monotonic()
    if not group.wait(timeout_seconds=1.0):
        print(f"Waiting up to {wait:g} s for room for {workers} replicas of {ask} "
              f"({'the autoscaler may add nodes' if autoscaling else 'the cluster is busy'}) ...", flush=True)
        if not group.wait(timeout_seconds=max(0.0, wait - (time.monotonic() - started))):
            remove_placement_group(group)
            raise ClusterError(
                f"no room for {workers} replicas of {ask} after {wait:g} s: the cluster has "
                f"{describe_cluster(nodes)}, partly in use; free resources, lower --workers, "
                f"or raise --resource-timeout")
    return group
