"""Ray's private APIs and message texts that raytorch reads (src/raytorch/compat/rayprivate.py),
checked against the installed Ray: an upgrade that moves one fails here, by name, not mid-run."""

import logging
import os
import signal

import pytest
import ray
from ray.exceptions import RayActorError

from raytorch.compat import rayprivate
from raytorch.group.errors import dead_rank, first_line


def test_the_loopback_constant_is_where_raytorch_sets_it():
    import ray._private.ray_constants as ray_constants

    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    rayprivate.keep_local_clusters_on_loopback()
    assert ray_constants.ENABLE_RAY_CLUSTER is False


def test_missing_module_is_pythons_text():
    try:
        import raytorch_no_such_module  # noqa: F401
    except ImportError as e:
        assert rayprivate.missing_module(f"{type(e).__name__}: {e}")


def test_the_token_authentication_warning_is_rays_and_left_out_alone():
    from ray._private.authentication import authentication_token_setup as setup

    assert setup.logger.name == rayprivate.TOKEN_AUTH_LOGGER
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    setup.logger.addHandler(handler)
    try:
        setup._warn_token_auth_enabled()  # what ray.init logs as it starts a new local Ray
        assert len(seen) == 1 and seen[0].startswith(rayprivate.TOKEN_AUTH_ENABLED), seen
        with rayprivate.token_auth_warning_left_out():
            setup._warn_token_auth_enabled()
            setup.logger.warning("another warning")
        setup._warn_token_auth_enabled()  # after: logged again
    finally:
        setup.logger.removeHandler(handler)
    assert seen[1:] == ["another warning", seen[0]]


def test_the_session_the_dashboard_and_the_cluster_address(ray_local):
    assert os.path.isdir(os.path.join(rayprivate.session_dir(), "logs"))
    assert rayprivate.dashboard_url().startswith("127.0.0.1:")
    found = rayprivate.running_cluster_address()
    assert found is None or found.startswith("127.0.0.1:")


def test_the_log_printer_is_found_and_wrapped(ray_local):
    def wrap(printer):
        def printing(data):
            printer(data)

        printing.raytorch_quiet = True
        return printing

    assert rayprivate.wrap_log_printer(wrap) is True
    assert rayprivate.wrap_log_printer(wrap) is True  # once: a wrapped printer is left as it is


def test_the_gcs_client_lists_draining_nodes(ray_local):
    client = rayprivate.gcs_client(ray.get_runtime_context().gcs_address)
    assert rayprivate.draining_nodes(client, timeout_s=5) == frozenset()


@ray.remote(num_cpus=0)
class Probe:
    def __init__(self, fail: bool = False):
        if fail:
            raise ValueError("no weights here")

    def ids(self):
        return ray.get_runtime_context().get_actor_id(), os.getpid()


def test_an_actor_id_and_the_error_of_an_init_that_raised(ray_local):
    probe = Probe.remote()
    actor_id, _ = ray.get(probe.ids.remote())
    assert rayprivate.actor_id(probe) == actor_id
    broken = Probe.remote(fail=True)
    with pytest.raises(RayActorError) as caught:
        ray.get(broken.ids.remote())
    assert rayprivate.failed_in_init(caught.value)
    assert "no weights here" in first_line(caught.value)
    for actor in (probe, broken):
        ray.kill(actor)


def test_a_dead_process_is_named_and_said_to_have_died(ray_local):
    probe = Probe.options(name="replica-7", namespace="raytorch-compat-test").remote()
    _, pid = ray.get(probe.ids.remote())
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RayActorError) as caught:
        ray.get(probe.ids.remote())
    error = caught.value
    assert not rayprivate.failed_in_init(error)
    assert rayprivate.actor_name(error) == "replica-7"
    assert dead_rank([], error) == 7
    assert rayprivate.process_died(error) is not None
    assert first_line(error).startswith("its process died")
