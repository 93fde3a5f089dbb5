"""raytorch's errors keep what they say as fields, across processes: a replica's error reaches the
driver pickled (inside Ray's RayTaskError), and the group hands it on as it was raised."""

import copy
import pickle

import pytest

from raytorch.errors import ConfigError, NonFiniteError, PeerError, ReplicaError, ReplicaLost


@pytest.mark.parametrize("kind", [ReplicaError, NonFiniteError, PeerError])
def test_a_replica_error_keeps_its_rank_and_step_when_pickled(kind):
    error = kind("replica 1 failed in run after 4 steps: ValueError: saw 42", rank=1, step=4)
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(again) is kind and str(again) == str(error)
        assert (again.rank, again.step) == (1, 4)


def test_fields_default_to_unknown():
    error = ReplicaError("replicas kept failing while recovering")
    assert (error.rank, error.step) == (None, None)


def test_a_lost_replica_keeps_its_ranks():
    lost = pickle.loads(pickle.dumps(ReplicaLost("replica-2 died while starting", ranks=[2], rank=2)))
    assert lost.ranks == [2] and lost.rank == 2 and lost.step is None
    assert str(lost) == "replica-2 died while starting"


def test_a_config_error_keeps_its_field():
    error = pickle.loads(pickle.dumps(ConfigError("workers", "must be at least 1, got 0")))
    assert error.field == "workers" and str(error) == "workers: must be at least 1, got 0"
