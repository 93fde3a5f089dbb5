"""Three tiers, assigned at collection (pyproject.toml registers the markers):

- `system`: real clusters and outside programs (ray.cluster_utils.Cluster, `ray up`, the browser,
  Prometheus, MLflow, S3, drivers run and killed as subprocesses); marked in their modules.
- `integration`: the session's one local Ray (the `ray_local` fixture), or a test marked so that
  starts a Ray of its own in this process.
- `unit`: everything else: no Ray at all (`ray.init` raises in a unit test; see `unit_tests_start_no_ray`).

    pytest -m unit          # seconds: pure logic and what runs in this process
    pytest -m "not system"  # with the session's local Ray
    pytest -q               # all three tiers
"""

import logging
import os
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marked = [tier for tier in TIERS if item.get_closest_marker(tier)]
        if "system" in marked:
            continue
        if "integration" in marked or "ray_local" in item.fixturenames:
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


class RayStartedInAUnitTest(AssertionError):
    pass


@pytest.fixture(autouse=True)
def unit_tests_start_no_ray(request, monkeypatch):
    """A unit test that starts Ray fails: mark it `integration` (or give it `ray_local`)."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    import ray

    running = ray.is_initialized()  # the session's Ray, where integration tests ran first

    def refused(*args, **kwargs):
        raise RayStartedInAUnitTest(f"{request.node.nodeid} is a unit test and called ray.init (or a Ray API that "
                                    "starts Ray): mark it pytest.mark.integration, or use the ray_local fixture")

    monkeypatch.setattr(ray, "init", refused)
    yield
    if not running and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} is a unit test and started Ray: mark it pytest.mark.integration")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, on 127.0.0.1, with room for 4 one-CPU replicas, and its
    dashboard (Ray's state API goes through it)."""
    from raytorch.group.cluster import keep_on_loopback

    keep_on_loopback()
    import ray

    # Replicas unpickle models and datasets defined in test modules: make tests/ importable there.
    tests = str(Path(__file__).parent)
    ray.init(num_cpus=4, include_dashboard=True, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": tests}})
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    os.environ["RAY_AUTH_MODE"] = "token"  # Ray's state API (tests find replicas' processes) reads the token
    yield ray
    ray.shutdown()
