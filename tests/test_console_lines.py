"""Lines a user reads, without Ray: they say what is so, in the user's terms (the API's field
beside the CLI's flag), and only when it holds."""

import re

import pytest

from raytorch import ConfigError, TrainConfig, Trainer
from raytorch.cli import main
from raytorch.driver.trainer import batchnorm_rule
from raytorch.output.lines import defaults_line, summary_line
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


def test_your_own_model_hears_which_figures_it_took_from_raytorchs_defaults(runs, capsys, tmp_path):
    own = ["train", "--model", "user_code:model", "--dataset", "user_code:data", "--loss", "user_code:half_mse"]
    assert main([*own, "--epochs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "lr 0.5, batch_size 100 are raytorch's defaults (set --lr, --batch-size)", lines
    assert sum("raytorch's default" in line for line in lines) == 1
    assert main([*own, "--epochs", "1", "--quiet"]) == 0  # no info line with --quiet, this one neither
    assert capsys.readouterr().out == ""
    (tmp_path / "run.yaml").write_text("lr: 0.01\nbatch_size: 16\n")  # what the file sets is the user's too
    assert main([*own, "--epochs", "1", "--config", str(tmp_path / "run.yaml")]) == 0
    assert "raytorch's default" not in capsys.readouterr().out
    assert main(["train", "--epochs", "1", "--max-steps", "2"]) == 0  # the built-in seed job: its own recipe
    assert "raytorch's default" not in capsys.readouterr().out


def test_the_defaults_line_names_only_what_your_own_model_took_unset():
    mine = TrainConfig(model="user_code:model", dataset="user_code:data", loss="MSELoss")
    given = {"model", "dataset", "loss"}
    assert defaults_line(mine, given) == ("lr 0.5, epochs 10, batch_size 100 are raytorch's defaults "
                                          "(set --lr, --epochs, --batch-size)")
    assert defaults_line(mine, given | {"lr", "epochs"}) == "batch_size 100 is raytorch's default (set --batch-size)"
    assert defaults_line(mine, given | {"lr", "epochs", "batch_size"}) is None
    on_digits = TrainConfig(model="user_code:model", dataset="digits", lr=0.01, epochs=20, batch_size=64)
    assert defaults_line(on_digits, {"model", "dataset"}).startswith("lr 0.01, epochs 20, batch_size 64 are")
    with_its_optimizer = TrainConfig(model="user_code:model", optimizer="user_code:optimizer")
    assert defaults_line(with_its_optimizer, {"model", "optimizer"}).startswith("epochs 10, batch_size 100 are")
    assert defaults_line(TrainConfig(model="mlp", dataset="digits"), set()) is None  # a built-in model


def test_the_split_line_reads_the_last_full_batch_not_a_short_last_one(runs, capsys):
    # 66 samples in batches of 16: each epoch ends on a batch of 2, which says nothing of the speeds
    Trainer(TrainConfig(**JOB, workers=2, split="adaptive"), model_fn=MLP["model_fn"], dataset_fn=MLP["data"],
            loss_fn=MLP["loss_fn"]).fit()
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("split of the samples"))
    parts = [int(n) for n in re.findall(r"\((\d+)(?: in the last full batch)?\)", line)]
    assert len(parts) == 2 and sum(parts) == 16, line
