"""Import paths: what a config names as `pkg.module:attr` (a model, a dataset, a loss, a step, an
optimizer, a schedule, a callback), imported when the run is built, not when the config is checked."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import ConfigError

if TYPE_CHECKING:
    from .schema import TrainConfig


def is_import_path(name: str) -> bool:
    return ":" in name


def imported(path: str) -> Any:
    """The object at 'pkg.module:attr', raising whatever importing it raises (ImportError,
    AttributeError, or an error of the module's own code)."""
    module_name, _, attr = path.partition(":")
    return attribute(importlib.import_module(module_name), attr)


def attribute(target: Any, dotted: str) -> Any:
    """target.a.b for 'a.b'."""
    for part in dotted.split("."):
        target = getattr(target, part)
    return target


def load(path: str, field: str) -> Any:
    """The object at 'pkg.module:attr', or a ConfigError naming the field and what failed."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(field, f"{path!r} is not an import path: write it as pkg.module:name")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import runs the module's code: any error can come out of it
        raise ConfigError(field, f"cannot import {module_name} ({type(e).__name__}: {e}); is it installed, or "
                                 f"on PYTHONPATH?") from e
    try:
        return attribute(module, attr)
    except AttributeError as e:
        raise ConfigError(field, f"{module_name} has no {attr!r}") from e


def imported_fns(config: TrainConfig) -> dict[str, Optional[Callable]]:
    """step_fn, optimizer_fn, schedule_fn, collate_fn and shard_blocks_fn that config names by import path (None where
    it does not)."""
    def named(value: Optional[str], field: str) -> Optional[Callable]:
        return load(value, field) if value is not None and is_import_path(value) else None

    return {"step_fn": named(config.step, "step"), "optimizer_fn": named(config.optimizer, "optimizer"),
            "schedule_fn": named(config.lr_schedule, "lr_schedule"), "collate_fn": named(config.collate, "collate"),
            "shard_blocks_fn": named(config.shard_blocks, "shard_blocks")}
