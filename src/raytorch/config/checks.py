"""The checks TrainConfig's validate() runs: each raises ConfigError naming the first invalid field and
what to do about it. Values only: nothing is imported, opened or asked of the machine here (what a
config needs of the machine it runs on, driver/preflight.py checks before the run starts)."""

from __future__ import annotations

import re
import typing
from typing import TYPE_CHECKING, Literal

from ..errors import ConfigError
from .recipes import BUILT_IN_CALLBACKS, BUILT_IN_DATASETS, BUILT_IN_MODELS

if TYPE_CHECKING:
    from .schema import TrainConfig

# Fields that take pkg.module:fn as well as a built-in name.
IMPORTABLE = ("optimizer", "lr_schedule")


def check(config: TrainConfig) -> None:
    """Raise ConfigError naming the first invalid field of `config` and what to do about it."""
    _check_types(config)
    _check_training(config)
    _check_devices(config)
    _check_outputs_and_recovery(config)
    _check_profile(config)


def _check_training(config: TrainConfig) -> None:
    """The run's arithmetic: replicas, epochs, batch, optimizer, schedule, evaluation."""
    if config.workers < 1:
        raise ConfigError("workers", f"must be at least 1, got {config.workers}")
    if config.epochs < 1:
        raise ConfigError("epochs", f"must be at least 1, got {config.epochs}")
    if config.batch_size < config.workers:
        raise ConfigError(
            "batch_size",
            f"{config.batch_size} is smaller than workers={config.workers}: every replica needs a sample; "
            f"raise batch_size or lower workers",
        )
    if config.loader_workers < 0:
        raise ConfigError("loader_workers", f"must be >= 0 threads, got {config.loader_workers}")
    if config.step is not None and config.loss is not None:
        raise ConfigError("loss", "a step (--step) computes its own loss: give --loss or --step, not both")
    if config.accumulate < 1:
        raise ConfigError("accumulate", f"must be at least 1 micro-batch per step, got {config.accumulate}")
    if config.sync_batchnorm and config.accumulate > 1:
        raise ConfigError("sync_batchnorm", "normalizes over each global batch in one forward per replica: set "
                                            "accumulate to 1")
    if config.sync_batchnorm and config.reduction not in ("auto", "collective"):
        raise ConfigError("sync_batchnorm", f"its batch statistics travel on the collective wire's process group: "
                                            f"set reduction to 'auto' or 'collective', not {config.reduction!r}")
    if config.grad_dtype == "bf16" and config.reduction not in ("auto", "collective"):
        raise ConfigError("grad_dtype", f"bf16 gradients travel on the collective wire: set reduction to 'auto' or "
                                        f"'collective', not {config.reduction!r}")
    _check_shard(config)
    if not config.lr > 0:
        raise ConfigError("lr", f"must be > 0, got {config.lr}")
    for name in ("warmup_steps", "weight_decay"):
        if getattr(config, name) < 0:
            raise ConfigError(name, f"must be >= 0, got {getattr(config, name)}")
    if config.grad_clip is not None and not config.grad_clip > 0:
        raise ConfigError("grad_clip", f"must be > 0 (a global norm), got {config.grad_clip}")
    for name in ("eval_every", "early_stop_patience"):
        if getattr(config, name) < 0:
            raise ConfigError(name, f"must be >= 0, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError("max_steps", f"must be at least 1, got {config.max_steps}")


def _check_profile(config: TrainConfig) -> None:
    """profile_steps: 'A:B', whole global steps with A < B, and somewhere to write the traces."""
    text = config.profile_steps
    if text is None:
        return
    parts = text.split(":")
    if len(parts) != 2 or not all(part.strip().isdecimal() for part in parts):
        raise ConfigError("profile_steps", f"must be A:B, the global steps from A up to B (not included), "
                                           f"e.g. 5:10; got {text!r}")
    first, end = config.profile_range
    if first >= end:
        raise ConfigError("profile_steps", f"A must be less than B (steps A .. B-1 are profiled), e.g. "
                                           f"{first}:{first + 5}; got {text!r}")
    if not config.output_dir:
        raise ConfigError("profile_steps", "traces go to output_dir/profile: set output_dir too")


def _check_devices(config: TrainConfig) -> None:
    """Devices and what each replica reserves."""
    if config.devices is not None:
        names = config.device_names
        wrong = [name for name in names if name not in ("cpu", "cuda")]
        if wrong:
            raise ConfigError("devices", f"each entry must be cpu or cuda, got {', '.join(map(repr, wrong))} in "
                                         f"{config.devices!r}")
        if len(names) != config.workers:
            raise ConfigError("devices", f"names {len(names)} device(s) for workers={config.workers}: give one per "
                                         f"replica, or set workers to {len(names)}")
        if config.spares:
            raise ConfigError("spares", "a spare must fit any replica's place, so spares need one device for all: "
                                        "drop devices (use device) or set spares to 0")
    kinds = set(config.device_names)
    if config.cpus_per_replica < 0 or ("cpu" in kinds and config.cpus_per_replica == 0):
        raise ConfigError("cpus_per_replica", f"must be > 0 for cpu replicas, got {config.cpus_per_replica}")
    gpus = config.gpus_per_replica
    if gpus is not None and kinds == {"cpu"} and gpus:
        raise ConfigError("gpus_per_replica", "needs device 'cuda'; set device to cuda or drop it")
    if gpus is not None and kinds != {"cpu"} and (gpus <= 0 or (gpus > 1 and gpus % 1)):
        raise ConfigError("gpus_per_replica", f"must be a fraction in (0, 1] or a whole number, got {gpus}")


def _check_shard(config: TrainConfig) -> None:
    """What sharding can carry (TrainConfig.shard): refused here, in one line naming the fix."""
    named = config.shard_blocks is None or re.fullmatch(r"[\w.]+:\w+", config.shard_blocks)
    if config.shard_blocks is not None and (config.shard != "full" or not named):
        raise ConfigError("shard_blocks", "names the units of shard 'full' as pkg.module:fn: set shard to 'full' and "
                                          "give pkg.module:fn")
    if config.shard == "optimizer" and config.reduction not in ("auto", "shared_memory"):
        raise ConfigError("shard", f"'optimizer' shards the update on the shared-memory wire (one node) for now: "
                                   f"set reduction to 'auto' or 'shared_memory', not {config.reduction!r}, "
                                   f"or shard to 'full' (any wire a process group carries)")
    if config.shard != "full":
        return
    refused = {"reduction": config.reduction not in ("auto", "collective") and
               f"FSDP2 runs on the collective wire's process group: set reduction to 'auto' or 'collective', "
               f"not {config.reduction!r}",
               "sync_batchnorm": config.sync_batchnorm and "synchronized BatchNorm is not sharded yet: use "
               "GroupNorm or LayerNorm, or shard 'none'",
               "precision": config.precision == "fp16" and "fp16 loss scaling is not sharded yet: use precision "
               "'bf16' (no loss scaling) or shard 'none'",
               "grad_dtype": config.grad_dtype != "fp32" and "FSDP2 reduce-scatters the gradient in its own dtype: "
               "set grad_dtype to 'fp32'",
               "compile": config.compile and "torch.compile of a sharded model is not tested here yet: drop "
               "--compile, or shard 'none'",
               "spares": config.spares and "a spare cannot take a lost shard's place: each replica holds the only "
               "copy of its shard; set spares to 0",
               "max_workers": config.max_workers is not None and "growing reshards the state, not built yet: drop "
               "max_workers"}
    for field, why in refused.items():
        if why:
            raise ConfigError(field, f"with shard 'full': {why}")


def _check_outputs_and_recovery(config: TrainConfig) -> None:
    """Outputs, checkpoints, callbacks, spares and timeouts; the named model and dataset (by name: nothing is
    imported or opened here, see driver/preflight.py)."""
    for spec in callback_specs(config):
        if spec not in BUILT_IN_CALLBACKS and not re.fullmatch(r"[\w.]+:\w+", spec):
            raise ConfigError("callbacks", f"{spec!r}: give 'mlflow', 'wandb' or pkg.module:Class, comma-separated")
    if config.checkpoint_every < 0:
        raise ConfigError("checkpoint_every", f"must be >= 0 steps, got {config.checkpoint_every}")
    if config.checkpoint_every and not config.output_dir:
        raise ConfigError("checkpoint_every", "checkpoints go to output_dir: set output_dir too")
    if config.log_every < 0:
        raise ConfigError("log_every", f"must be >= 0 steps, got {config.log_every}")
    if config.tensorboard and not config.output_dir:
        raise ConfigError("tensorboard", "event files go to output_dir: set output_dir too")
    if config.keep_checkpoints < 1:
        raise ConfigError("keep_checkpoints", f"must be at least 1, got {config.keep_checkpoints}")
    if config.spares < 0:
        raise ConfigError("spares", f"must be >= 0, got {config.spares}")
    if not 1 <= config.min_workers <= config.workers:
        raise ConfigError("min_workers", f"must be between 1 and workers={config.workers}, got {config.min_workers}")
    if config.max_workers is not None:
        if config.max_workers < config.workers:
            raise ConfigError("max_workers", f"must be at least workers={config.workers}, got {config.max_workers}")
        if config.spares or config.devices:
            raise ConfigError("max_workers", "an elastic run grows into free room by itself, each replica alike: "
                                             "drop spares and devices, or max_workers")
        if config.batch_size < config.max_workers:
            raise ConfigError("max_workers", f"{config.max_workers} replicas would leave some without a sample of a "
                                             f"batch of {config.batch_size}: raise batch_size or lower max_workers")
    for name in ("replace_timeout", "step_timeout"):
        if not getattr(config, name) > 0:
            raise ConfigError(name, f"must be > 0 seconds, got {getattr(config, name)}")
    if config.resource_timeout is not None and config.resource_timeout < 0:
        raise ConfigError("resource_timeout", f"must be >= 0 seconds, got {config.resource_timeout}")
    for name, known in (("model", BUILT_IN_MODELS), ("dataset", BUILT_IN_DATASETS)):
        value = getattr(config, name)
        if value is not None and value not in known and ":" not in value:
            raise ConfigError(name, f"unknown {name} {value!r}; choose one of {', '.join(sorted(known))}, "
                                     f"or give your own as pkg.module:factory")


def callback_specs(config: TrainConfig) -> list[str]:
    """The callbacks the config names, in order."""
    return [spec.strip() for spec in (config.callbacks or "").split(",") if spec.strip()]


def _check_types(config: TrainConfig) -> None:
    for name, hint in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        optional = type(None) in typing.get_args(hint)
        if value is None and optional:
            continue
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
        if typing.get_origin(base) is Literal:
            importable = name in IMPORTABLE and isinstance(value, str) and ":" in value
            if value not in typing.get_args(base) and not importable:
                choices = ", ".join(map(str, typing.get_args(base)))
                choices += ", or pkg.module:fn" if name in IMPORTABLE else ""
                raise ConfigError(name, f"unknown value {value!r}; choose one of {choices}")
            continue
        ok = {
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            bool: isinstance(value, bool),
            str: isinstance(value, str),
        }[base]
        if not ok:
            raise ConfigError(name, f"must be of type {base.__name__}, got {value!r} ({type(value).__name__})")
        if base is float:
            object.__setattr__(config, name, float(value))  # 1 -> 1.0: the one normalisation, at creation
