import logging
import os
from pathlib import Path

import pytest

from raytorch.group.cluster import keep_on_loopback


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, on 127.0.0.1, with room for 4 one-CPU replicas, and its
    dashboard (Ray's state API goes through it)."""
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
