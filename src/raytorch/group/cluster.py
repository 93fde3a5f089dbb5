"""Starting or joining Ray: a local instance kept on 127.0.0.1, or an existing cluster."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import ray

from ..compat import rayprivate
from ..errors import ClusterError
from . import watchdog

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Session:
    """The Ray instance a run uses."""

    gcs_address: str
    dashboard_url: Optional[str]
    started_here: bool
    resources: dict[str, float]
    """What the cluster has in all (Ray's cluster_resources()): CPU, GPU, ..."""
    is_driver: bool = True
    """This process is a Ray driver (a script, a job), not a Ray worker (a Tune trial's actor)."""


def keep_on_loopback() -> None:
    """Make this process and the Ray processes it starts bind 127.0.0.1, not the host's address.

    Ray reads the variable once, at import, and otherwise resolves 127.0.0.1 to the machine's
    outward address; Ray's children read it from the environment we pass on.
    """
    os.environ[LOOPBACK_ENV] = "0"
    rayprivate.keep_local_clusters_on_loopback()


def resolve_address(address: Optional[str]) -> Optional[str]:
    """The cluster to join as host:port (or ray://host:port), or None for a new local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        return None
    if address == "auto":
        found = rayprivate.running_cluster_address()
        if not found:
            raise ClusterError("address 'auto': no running Ray cluster found on this machine; "
                               "start one with `ray start --head`, or drop --address to run on a local Ray")
        return found
    return address


def host_port(address: str) -> tuple[str, int]:
    """Split 'host:port' or 'ray://host:port'."""
    bare = address.split("://", 1)[-1]
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"address {address!r} is not host:port; e.g. --address 127.0.0.1:6379 or --address auto")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def ray_session(address: Optional[str] = None, metadata: Optional[dict[str, str]] = None,
                quiet: bool = False) -> Iterator[Session]:
    """Use the Ray this process already holds, join `address`, or start a local Ray on 127.0.0.1.

    `metadata` labels the job Ray shows (its "job_name" is the Jobs page's Name column); `quiet`
    leaves out the warning a new local Ray logs that it enables token authentication.
    Ray started or joined here is shut down (or disconnected) on exit.
    """
    metadata = metadata or {"job_name": "raytorch"}
    if ray.is_initialized():
        yield _describe(started_here=False)
        return
    target = resolve_address(address)
    if target is None:
        keep_on_loopback()
        # "local": a new instance even where `ray start` left a cluster running on this machine.
        _init(metadata, quiet, address="local", include_dashboard=True, dashboard_host="127.0.0.1")
        session = _describe(started_here=True)
        if not session.gcs_address.startswith("127.0.0.1:"):
            ray.shutdown()
            raise ClusterError(f"local Ray came up on {session.gcs_address}, not 127.0.0.1; "
                               f"refusing to run off loopback")
    else:
        host, port = host_port(target)
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ClusterError(f"cannot reach a Ray cluster at {target} ({e.strerror or e}); check --address / "
                               f"RAY_ADDRESS, start one with `ray start --head`, or drop --address for a local "
                               f"Ray") from e
        if is_loopback(host):
            keep_on_loopback()
        _init(metadata, quiet, address=target)
        session = _describe(started_here=False)
    # a local Ray's agents would outlive a driver killed with SIGKILL: its watchdog ends them
    guard = watchdog.start(os.getpid()) if target is None else None
    try:
        yield session
    finally:
        if guard is not None:
            guard.kill()  # the driver ends normally: its watchdog first, then Ray ends its own processes
            guard.wait()
        ray.shutdown()


def _init(metadata: dict[str, str], quiet: bool, **kwargs) -> None:
    try:
        with rayprivate.token_auth_warning_left_out() if quiet else nullcontext():
            ray.init(logging_level=logging.WARNING,
                     job_config=ray.job_config.JobConfig(metadata=metadata), **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"Ray did not start or connect: {e}") from e


def _describe(started_here: bool) -> Session:
    context = ray.get_runtime_context()
    url = rayprivate.dashboard_url()
    return Session(gcs_address=context.gcs_address, dashboard_url=url or None, started_here=started_here,
                   resources=ray.cluster_resources(), is_driver=context.worker.mode == ray.SCRIPT_MODE)


def loopback_cluster(nodes: int, cpus_per_node: float):
    """A multi-node Ray cluster inside this process, every node on 127.0.0.1: a head with no CPU
    (it runs the driver, as in cluster.yaml) and `nodes` worker nodes, each its own raylet. For
    tests and benchmarks; the caller shuts it down. Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before
    Ray is imported, and RAY_TMPDIR to a fresh directory."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    try:
        if not cluster.address.startswith("127.0.0.1:"):
            raise ClusterError(f"the loopback cluster came up on {cluster.address}, not 127.0.0.1")
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster

