"""Ray's private APIs and the texts of its messages that raytorch reads, for Ray 2.60 (the line
pyproject.toml pins). Each name here is checked by tests/test_compat.py against the installed Ray.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import ray

# -- private modules and attributes -----------------------------------------------------------


def keep_local_clusters_on_loopback() -> None:
    """What RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets, for a process that imported Ray before the
    variable was set: Ray reads it once, at import, into this constant."""
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def running_cluster_address() -> Optional[str]:
    """The address of the Ray cluster started on this machine (`ray start`), as `address='auto'`
    finds it; None where none runs."""
    from ray._private.utils import read_ray_address

    return read_ray_address()


def dashboard_url() -> Optional[str]:
    """The dashboard's host:port of the Ray this process is connected to (None without one)."""
    return ray._private.worker.get_dashboard_url() or None


def session_dir() -> str:
    """The session directory (logs, ports) of the Ray this process is connected to."""
    return ray._private.worker._global_node.get_session_dir_path()


def wrap_log_printer(wrap: Callable[[Callable[[dict], None]], Callable[[dict], None]]) -> bool:
    """Replace the printer Ray's log forwarding uses in this driver by `wrap(printer)`, once per
    process (a wrapped printer has `raytorch_quiet`); returns whether Ray's printer was found."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    found = False
    with dispatcher._lock:
        for index, (name, handler) in enumerate(dispatcher.handlers):
            if name == "ray_print_logs":
                found = True
                if not getattr(handler, "raytorch_quiet", False):
                    dispatcher.handlers[index] = (name, wrap(handler))
    return found


def gcs_client(gcs_address: str) -> Any:
    """A client of Ray's GCS (what `ray drain-node` and the autoscaler talk to)."""
    from ray._raylet import GcsClient

    return GcsClient(address=gcs_address)


def draining_nodes(client: Any, timeout_s: float) -> frozenset:
    """Ids (hex) of the nodes Ray marks as draining, asked of `client` (gcs_client)."""
    return frozenset(client.get_draining_nodes(timeout=timeout_s))


def actor_id(actor: Any) -> str:
    """The hex id of an actor handle (what RayActorError.actor_id names)."""
    return actor._actor_id.hex()


# -- the texts of Ray's messages ---------------------------------------------------------------

CREATION_FAILED = "error raised in its creation task"
"""In a RayActorError's text where the actor's __init__ raised (no retry helps)."""

PROCESS_DIED = "worker process has died"
"""In a RayActorError's text where the actor's process died (killed, out of memory, crashed)."""

_EXIT_TYPE = re.compile(r"Worker exit type: (\w+)")
_ACTOR_NAME = re.compile(r"\bname: ([\w.-]+)")


def failed_in_init(error: Exception) -> bool:
    """Whether an actor's error says its __init__ raised."""
    return CREATION_FAILED in str(error)


def actor_name(error: Exception) -> Optional[str]:
    """The name of the dead actor an error's text names (Ray names it where the actor was named)."""
    found = _ACTOR_NAME.search(str(error))
    return found.group(1) if found else None


def process_died(error: Exception) -> Optional[str]:
    """Where an error says the actor's process died: Ray's exit type for it ('' where not given);
    None where it does not say so."""
    text = str(error)
    if PROCESS_DIED not in text:
        return None
    exit_type = _EXIT_TYPE.search(text)
    return exit_type.group(1) if exit_type else ""


TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
"""The logger of Ray's module that sets up token authentication for a new local Ray."""

TOKEN_AUTH_ENABLED = "Token authentication is enabled for this Ray cluster"
"""How its warning that a new local Ray enables token authentication begins."""


@contextmanager
def token_auth_warning_left_out() -> Iterator[None]:
    """Within: Ray's warning that the local Ray it starts enables token authentication is not
    logged (its other records are)."""
    def other(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_AUTH_ENABLED)

    logger = logging.getLogger(TOKEN_AUTH_LOGGER)
    logger.addFilter(other)
    try:
        yield
    finally:
        logger.removeFilter(other)


def missing_module(reason: str) -> bool:
    """Whether a failure's text is Python's for a module that cannot be imported."""
    return "No module named" in reason
