"""What the built-in names stand for: the built-in models, datasets and callbacks a config may
name (the names alone; the models and datasets themselves are tasks/builtin.py's, the callbacks
trackers.py's), and what the CLI fills in for a built-in dataset (its recipe) and reads in an
elastic `workers MIN:MAX`."""

from __future__ import annotations

from ..errors import ConfigError

BUILT_IN_MODELS = ("linear", "mlp")
"""tasks.builtin.MODELS' names (tests/test_config.py keeps them equal)."""

BUILT_IN_DATASETS = ("linear", "digits", "classification")
"""tasks.builtin.DATASETS' names (tests/test_config.py keeps them equal)."""

BUILT_IN_CALLBACKS = {"mlflow": "raytorch.trackers:MLflowCallback", "wandb": "raytorch.trackers:WandbCallback"}
"""The callbacks a config names without a path, as the import paths they stand for (loaded as a
user's own pkg.module:Class is)."""

# What the CLI uses for each built-in dataset where neither flags nor the config file say
# (with_recipe). linear: the seed job's fast recipe; digits: 98% eval accuracy in plain
# PyTorch (mlp, Adam 1e-2, batch 64, 20 epochs). The model is the one tasks.builtin.DATASETS
# gives the dataset (tests/test_config.py keeps them equal): in the config, so that `config show`
# and the run directory's config.yaml name it.
RECIPES: dict[str, dict] = {
    "linear": {"model": "linear", "optimizer": "adam", "lr": 0.5, "lr_schedule": "cosine", "batch_size": 100,
               "epochs": 10},
    "digits": {"model": "mlp", "optimizer": "adam", "lr": 1e-2, "lr_schedule": "constant", "batch_size": 64,
               "epochs": 20},
    "classification": {"model": "mlp", "optimizer": "adam", "lr": 1e-2, "lr_schedule": "constant", "batch_size": 64,
                       "epochs": 10},
}

# A recipe's fields that go together: an lr and schedule tuned for one optimizer do not fit another,
# so where the flags or the file set any of a group, the recipe sets none of it.
RECIPE_GROUPS = (("model",), ("optimizer", "lr", "lr_schedule", "warmup_steps"), ("batch_size",), ("epochs",))


def with_recipe(values: dict) -> dict:
    """`values` with what a built-in dataset's recipe sets (model, optimizer with lr and schedule,
    batch size, epochs), group by group, where neither the file nor the flags set any of the group."""
    recipe = RECIPES.get(values.get("dataset", "linear"), {})
    filled = dict(values)
    for group in RECIPE_GROUPS:
        if not any(name in values for name in group):
            filled.update({name: recipe[name] for name in group if name in recipe})
    return filled


def elastic_range(values: dict) -> dict:
    """`values` with workers 'MIN:MAX' (flag or file) as workers and min_workers MIN, max_workers MAX;
    a plain count as an int."""
    workers = values.get("workers")
    if not isinstance(workers, str):
        return values
    low, colon, high = workers.partition(":")
    try:
        if not colon:
            return {**values, "workers": int(workers)}
        return {**values, "workers": int(low), "min_workers": int(low), "max_workers": int(high)}
    except ValueError:
        raise ConfigError("workers", f"must be a count (2) or an elastic range MIN:MAX (2:4), "
                                     f"got {workers!r}") from None
