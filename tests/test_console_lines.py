"""Lines a user reads, without Ray: they say what is so, in the user's terms (the API's field
beside the CLI's flag), and only when it holds."""

import re

import pytest

from raytorch import ConfigError, TrainConfig, Trainer
from raytorch.driver.trainer import batchnorm_rule
from raytorch.output.lines import summary_line
from test_driver_unit import JOB, MLP
from test_driver_unit import runs as runs  # noqa: F401  (the fixture)

pytestmark = pytest.mark.unit


def test_a_step_and_a_loss_together_are_refused():
    with pytest.raises(ConfigError, match=r"^loss: a step \(--step\) computes its own loss: give --loss or --step"):
        TrainConfig(step="user_code:step", loss="MSELoss")


def test_one_replica_is_one_replica():
    assert "Done: 10 steps on 1 replica in 2.0 s (50 samples/s)" in summary_line(0.1, None, 10, 100, 2.0, 1)
    assert "on 2 replicas in" in summary_line(0.1, None, 10, 100, 2.0, 2)


def test_the_batchnorm_line_names_the_api_field_too():
    assert "--sync-batchnorm (TrainConfig(sync_batchnorm=True))" in batchnorm_rule(TrainConfig())


def test_the_split_line_reads_the_last_full_batch_not_a_short_last_one(runs, capsys):
    # 66 samples in batches of 16: each epoch ends on a batch of 2, which says nothing of the speeds
    Trainer(TrainConfig(**JOB, workers=2, split="adaptive"), model_fn=MLP["model_fn"], dataset_fn=MLP["data"],
            loss_fn=MLP["loss_fn"]).fit()
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("split of the samples"))
    parts = [int(n) for n in re.findall(r"\((\d+)(?: in the last full batch)?\)", line)]
    assert len(parts) == 2 and sum(parts) == 16, line
