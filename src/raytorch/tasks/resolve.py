"""What a config's model, dataset and loss name: a built-in, or your own as `pkg.module:attr`.

    --model mypkg.nets:make_cnn          a zero-argument callable returning an nn.Module
    --dataset mypkg.data:digits          a zero-argument callable returning a Dataset, or (train, eval)
    --loss CrossEntropyLoss              a torch.nn loss class, or mypkg.losses:focal (loss(output, target))
    --step mypkg.steps:lm_step           fn(model, batch) -> loss, in place of --loss
    --optimizer mypkg.opt:make           fn(model) -> torch.optim.Optimizer
    --lr-schedule mypkg.opt:schedule     fn(optimizer, total_steps) -> scheduler

Everything is imported in the driver, before Ray starts (model, dataset and loss here; step,
optimizer and schedule by config/imports.py's imported_fns): a bad path fails at once with the
field and what failed to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch

from ..config.imports import is_import_path, load
from ..config.schema import TrainConfig
from ..errors import ConfigError
from . import builtin as builtins


@dataclass(frozen=True)
class Training:
    """The callables a Trainer takes."""

    model_fn: Callable[[], torch.nn.Module]
    dataset_fn: Callable
    eval_dataset_fn: Optional[Callable]
    loss_fn: Optional[Callable]


def loss_function(name: str) -> Callable:
    """A torch.nn loss by class name (CrossEntropyLoss, MSELoss, ...), or an import path."""
    if is_import_path(name):
        return load(name, "loss")
    cls = getattr(torch.nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.modules.loss._Loss)):
        known = sorted(n for n in dir(torch.nn) if n.endswith("Loss"))
        raise ConfigError("loss", f"{name!r} is not a torch.nn loss; use one of {', '.join(known)}, "
                                  f"or pkg.module:function")
    return cls()


def training(config: TrainConfig) -> Training:
    """The model, data and loss the config names."""
    if is_import_path(config.dataset):
        dataset_factory = load(config.dataset, "dataset")
        data = _call(dataset_factory, "dataset")
        train, evaluation = data if isinstance(data, tuple) else (data, None)
        dataset_fn, eval_fn, task = (lambda: train), ((lambda: evaluation) if evaluation is not None else None), None
    else:
        task = builtins.DATASETS[config.dataset]
        dataset_fn, eval_fn = partial(task.train, config.seed), partial(task.eval, config.seed)
    if config.model is not None and is_import_path(config.model):
        model_fn = load(config.model, "model")
        _call(model_fn, "model")  # built here once: a factory that fails says so before Ray starts
    elif task is not None:
        model_fn = partial(builtins.MODELS[config.model or task.model], task.in_features, task.out_features)
    else:
        raise ConfigError("model", "built-in models need a built-in dataset (their sizes come from it); with your "
                                   "own dataset give your own model: --model pkg.module:factory")
    if config.step is not None:
        loss_fn = None  # the step computes the loss (config.imports.imported_fns)
    elif config.loss is not None:
        loss_fn = loss_function(config.loss)
    elif task is not None:
        loss_fn = task.loss
    else:
        raise ConfigError("loss", "your own dataset needs a loss: --loss CrossEntropyLoss (any torch.nn loss), "
                                  "--loss pkg.module:function, or your own step: --step pkg.module:fn")
    return Training(model_fn=model_fn, dataset_fn=dataset_fn, eval_dataset_fn=eval_fn, loss_fn=loss_fn)


def _call(factory: Any, field: str) -> Any:
    if not callable(factory):
        raise ConfigError(field, f"{factory!r} is not callable: name a zero-argument function or class")
    try:
        return factory()
    except Exception as e:
        raise ConfigError(field, f"calling {getattr(factory, '__name__', factory)}() failed: "
                                 f"{type(e).__name__}: {e}") from e
