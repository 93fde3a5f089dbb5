"""A replica that raises: the run stops with a ReplicaError naming the replica, not a Ray traceback."""

import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raytorch import ReplicaError, TrainConfig, Trainer
from raytorch.data.datasets import ArrayDataset


class Picky(torch.nn.Linear):
    def __init__(self):
        super().__init__(1, 1)

    def forward(self, x):
        if (x == 42).any():
            raise ValueError("saw 42")
        return super().forward(x)


def test_error_inside_a_replica_names_it_and_the_cause_after_one_retry(ray_local):
    x = np.arange(8, dtype=np.float32).reshape(-1, 1)
    x[7] = 42  # the last sample: with no shuffle, the second replica of the second step meets it
    data = ArrayDataset(x, 2 * x)
    config = TrainConfig(workers=2, epochs=1, batch_size=4, shuffle=False, optimizer="sgd", lr=1e-3)
    # on_error retry (the default): replica 1 is ended and replaced, and its replacement meets 42 again
    with pytest.raises(ReplicaError, match=r"^replica 1 failed in run after 1 steps: ValueError: saw 42; step 1 "
                                           r"failed again after a retry; no checkpoint written \(set output_dir\)$"):
        Trainer(config, model_fn=Picky, dataset_fn=lambda: data, loss_fn=F.mse_loss, quiet=True).fit()


def test_model_that_cannot_be_built(ray_local):
    def broken():
        raise RuntimeError("no weights here")

    calls = []

    def model_fn():
        calls.append(1)
        return torch.nn.Linear(1, 1) if len(calls) == 1 else broken()  # the driver's call works, replicas' fail

    config = TrainConfig(workers=2, epochs=1, batch_size=4)
    with pytest.raises(ReplicaError, match=r"replica \d died: .*no weights here"):
        Trainer(config, model_fn=model_fn, dataset_fn=lambda: ArrayDataset(np.ones((4, 1), np.float32),
                                                                           np.ones((4, 1), np.float32)),
                loss_fn=F.mse_loss, quiet=True).fit()


class Doomed(torch.nn.Linear):
    """Kills its own process (SIGKILL, as the OOM killer would) when it meets the sample x = -1."""

    def __init__(self):
        super().__init__(1, 1)

    def forward(self, x):
        if (x == -1).any():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


# One wire: that a killed replica's peers do not hang on any wire is test_reliability's matrix
# (a SIGKILL on each wire, recovered); what this adds is the stop, which no wire changes.
@pytest.mark.parametrize("reduction", ["shared_memory"])
def test_a_step_that_kills_its_replica_each_time_stops_naming_it_and_its_peers_do_not_hang(ray_local, reduction):
    x = np.arange(64, dtype=np.float32).reshape(-1, 1)
    x[44] = -1  # the only one: step 5 of 8, in the second replica's half
    data = ArrayDataset(x, 2 * x)
    config = TrainConfig(workers=2, epochs=1, batch_size=8, shuffle=False, optimizer="sgd", lr=1e-5,
                         reduction=reduction)
    with pytest.raises(ReplicaError, match=r"^replica 1 died"):
        Trainer(config, model_fn=Doomed, dataset_fn=lambda: data, loss_fn=F.mse_loss, quiet=True).fit()
