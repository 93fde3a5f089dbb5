"""Reserving the cluster's resources for all replicas at once, or saying why that cannot happen."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)

from ..errors import ClusterError

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


def describe_bundle(bundle: dict[str, float]) -> str:
    """'1 CPU, 0.5 GPU'."""
    return ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())


def describe_bundles(bundles: list[dict[str, float]]) -> str:
    """'3 replicas of 1 CPU each', or per kind: '2 replicas of 1 CPU, 1 GPU and 1 of 1 CPU'."""
    kinds = Counter(tuple(bundle.items()) for bundle in bundles)
    asks = [(count, describe_bundle(dict(kind))) for kind, count in kinds.items()]
    if len(asks) == 1:
        return f"{asks[0][0]} replicas of {asks[0][1]} each"
    return f"{asks[0][0]} replicas of {asks[0][1]} and " + " and ".join(f"{n} of {ask}" for n, ask in asks[1:])


def shortfall(node_resources: list[dict[str, float]], bundles: list[dict[str, float]]) -> str | None:
    """Why `bundles` can never fit on the nodes (each bundle on one node), or None where they may."""
    kinds = Counter(tuple(bundle.items()) for bundle in bundles)
    for kind, count in kinds.items():
        fits = replicas_that_fit(node_resources, dict(kind))
        if fits < count:
            return f"room for {fits}" + ("" if len(kinds) == 1 else f" of {describe_bundle(dict(kind))}")
    for name in {name for bundle in bundles for name in bundle}:  # kinds that fit alone may not fit together
        have, want = sum(n.get(name, 0.0) for n in node_resources), sum(b.get(name, 0.0) for b in bundles)
        if want > have:
            return f"{want:g} {name} asked in all"
    return None


TRY_S = 2.0  # elastic start: how long a size larger than the least is given to fit


def reserve_what_fits(bundles: list[dict[str, float]], least: int, most: int, strategy: str,
                      timeout_s: float | None) -> tuple[PlacementGroup, int]:
    """A ready placement group of `bundles` (`least` replicas' and the spares'), or for an elastic
    run (most > least: replicas alike, no spares) of as many as fit now, from `most` down: each
    size above `least` gets TRY_S to be placed; `least` is reserved as reserve() does (waiting,
    or a ClusterError). Returns the group and the replicas it holds."""
    for count in range(most, least, -1):
        group = placement_group([dict(bundles[0]) for _ in range(count)], strategy=strategy.upper())
        if group.wait(timeout_seconds=TRY_S):
            return group, count
        remove_placement_group(group)
    return reserve(bundles, strategy, timeout_s), least


def reserve(bundles: list[dict[str, float]], strategy: str, timeout_s: float | None) -> PlacementGroup:
    """A ready placement group of `bundles` (one per replica), or a ClusterError that says what the cluster has.

    Args:
        strategy: 'pack' or 'spread', as Ray's PACK and SPREAD. SPREAD, not STRICT_SPREAD: it puts
            the bundles on distinct nodes where it can and shares nodes where it must, so the same
            room check holds for both, and W replicas need not wait for W nodes.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    autoscaling = AUTOSCALER_MARKER.exists()
    short = shortfall(nodes, bundles)
    ask = describe_bundles(bundles)
    if short and not autoscaling:
        raise ClusterError(
            f"{ask} cannot fit: the cluster has {describe_cluster(nodes)} ({short}); lower --workers or the "
            f"per-replica resources, or add nodes")
    wait = timeout_s if timeout_s is not None else (DEFAULT_AUTOSCALE_WAIT_S if autoscaling else DEFAULT_WAIT_S)
    group = placement_group([dict(bundle) for bundle in bundles], strategy=strategy.upper())
    started = time.monotonic()
    if not group.wait(timeout_seconds=1.0):
        print(f"Waiting up to {wait:g} s for room for {ask} "
              f"({'the autoscaler may add nodes' if autoscaling else 'the cluster is busy'}) ...", flush=True)
        if not group.wait(timeout_seconds=max(0.0, wait - (time.monotonic() - started))):
            remove_placement_group(group)
            raise ClusterError(
                f"no room for {ask} after {wait:g} s: the cluster has "
                f"{describe_cluster(nodes)}, partly in use; free resources, lower --workers, "
                f"or raise --resource-timeout")
    return group


class Reservation(NamedTuple):
    """Where the replicas go: a placement group, the index of replica 0's bundle in it, how many
    replicas it holds, and whether it was made here (and is removed at the end)."""

    group: PlacementGroup
    first: int
    workers: int
    owned: bool


def reserve_replicas(bundles: list[dict[str, float]], least: int, most: int, strategy: str,
                     timeout_s: float | None) -> Reservation:
    """The replicas' bundles: in the placement group this driver runs in where it runs in one (a Ray
    Tune trial's: its last bundles are the replicas', see raytorch.tune), else a new one
    (reserve_what_fits)."""
    current = get_current_placement_group()
    if current is None:
        group, count = reserve_what_fits(bundles, least, most, strategy, timeout_s)
        return Reservation(group, 0, count, True)
    specs = current.bundle_specs
    first = len(specs) - len(bundles)
    if first < 0 or any(any(spec.get(name, 0.0) < amount for name, amount in bundle.items())
                        for spec, bundle in zip(specs[first:], bundles)):
        raise ClusterError(
            f"this driver runs in a placement group of {len(specs)} bundle(s) "
            f"({'; '.join(map(describe_bundle, specs))}), "
            f"whose last {len(bundles)} must each hold a replica ({describe_bundles(bundles)}); in Ray Tune, "
            f"wrap the run with raytorch.tune.trainable, which asks for them")
    if not current.wait(timeout_seconds=timeout_s if timeout_s is not None else DEFAULT_WAIT_S):
        raise ClusterError("the placement group this driver runs in is not ready")
    return Reservation(current, first, least, False)
