"""Ray Tune: three trials on local Ray, ASHA stops some, the best trial's config and checkpoint come
back, and its result is a plain raytorch run's with that config."""

import pytest
import torch
from torch import nn

from raytorch import ConfigError, TrainConfig, Trainer
from raytorch.persist.checkpoint import load
from raytorch.tune import read_search, search_space, trainable, trial_bundles, trial_config


def test_trial_config_takes_fields_only():
    base = TrainConfig(workers=2).to_dict()
    assert trial_config(base, {"lr": 0.01}).lr == 0.01
    with pytest.raises(ConfigError, match="unknown key.s. learning_rate: param_space keys are TrainConfig fields"):
        trial_config(base, {"learning_rate": 0.01})
    with pytest.raises(ConfigError, match="lr: "):
        trial_config(base, {"lr": -1.0})


def test_a_trial_asks_for_its_driver_and_each_replica():
    config = TrainConfig(workers=3, cpus_per_replica=0.5, spares=1)
    assert trial_bundles(config, 1.0) == [{"CPU": 1.0}] + [{"CPU": 0.5}] * 4


def test_elastic_runs_and_output_dirs_are_refused_in_a_trial():
    with pytest.raises(ConfigError, match="max_workers: a Tune trial runs in the resources Tune gives it"):
        trainable(model_fn=nn.Linear, dataset_fn=list, workers=1, min_workers=1, max_workers=2)


def test_search_yaml(tmp_path):
    from ray.tune.search.sample import Categorical, Float

    path = tmp_path / "search.yaml"
    path.write_text("train: {dataset: digits, workers: 2}\nsearch:\n  lr: {loguniform: [1e-4, 1e-1]}\n"
                    "  batch_size: {choice: [32, 64]}\n  epochs: 3\ntrials: 4\n")
    space = search_space(read_search(str(path))["search"])
    assert isinstance(space["lr"], Float) and (space["lr"].lower, space["lr"].upper) == (1e-4, 1e-1)
    assert isinstance(space["batch_size"], Categorical) and space["epochs"] == 3
    path.write_text("search:\n  lr: {normal: [0, 1]}\n")
    with pytest.raises(ConfigError, match="search.lr: give one of loguniform, uniform, randint, choice, grid"):
        search_space(read_search(str(path))["search"])
    path.write_text("search:\n  learning_rate: {choice: [1]}\n")
    with pytest.raises(ConfigError, match="unknown field.s. learning_rate"):
        read_search(str(path))


def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))


def regression(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [3.0], [0.5]]))


def test_asha_stops_the_worse_trials_and_the_best_is_a_plain_run(ray_local, tmp_path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = dict(workers=2, cpus_per_replica=0.5, epochs=3, batch_size=16, optimizer="sgd", split="even")
    functions = dict(model_fn=mlp, dataset_fn=regression, eval_dataset_fn=lambda: regression(32, 1),
                     loss_fn=nn.functional.mse_loss)
    # grid order: the best learning rate first, so ASHA has it at the first rung when the others arrive
    tuner = tune.Tuner(
        trainable(**functions, driver_cpus=0.5, **base),
        param_space={"lr": tune.grid_search([0.05, 1e-4, 1e-5])},
        tune_config=tune.TuneConfig(metric="eval_loss", mode="min", max_concurrent_trials=2,
                                    scheduler=ASHAScheduler(grace_period=1, reduction_factor=2, max_t=3)),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="search", verbose=0))
    groups_before = len(ray_local.util.placement_group_table())
    results = tuner.fit()
    assert not results.errors, results.errors
    # each trial's replicas went into its own placement group: no group made beside the three trials'
    assert len(ray_local.util.placement_group_table()) - groups_before == 3
    epochs = sorted(r.metrics["epoch"] for r in results)
    assert epochs[-1] == 2 and epochs[0] < 2, epochs  # the best ran all 3 epochs; ASHA stopped some early
    best = results.get_best_result()
    assert best.config["lr"] == 0.05 and best.checkpoint is not None
    with best.checkpoint.as_directory() as saved:
        (path,) = (p for p in (__import__("pathlib").Path(saved) / "checkpoints").iterdir() if p.suffix == ".pt")
        state = load(path)["model"]
    plain = Trainer(TrainConfig(**base, lr=0.05), **functions, quiet=True).fit()
    assert best.metrics["train_loss"] == pytest.approx(plain.epoch_losses[-1], rel=1e-6)
    assert best.metrics["eval_loss"] == pytest.approx(plain.eval_losses[-1], rel=1e-6)
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_a_restored_trial_gets_its_checkpoint_back_where_resume_reads_it(tmp_path):
    """What Tune hands a trial it pauses and resumes: the reported checkpoint, copied into the
    trial's run directory, where Trainer(resume_from=...) finds it valid."""
    from ray import tune

    from raytorch.persist.checkpoint import load_latest, save
    from raytorch.tune import restore_into

    reported = tmp_path / "reported"
    save(reported, 24, {"model": {"w": torch.ones(2)}}, keep=1)
    run_dir = tmp_path / "trial" / "raytorch-run"
    assert not restore_into(None, run_dir) and not run_dir.exists()
    assert restore_into(tune.Checkpoint.from_directory(str(reported)), run_dir)
    payload, path, skipped = load_latest(run_dir)
    assert payload["step"] == 24 and torch.equal(payload["model"]["w"], torch.ones(2)) and not skipped
