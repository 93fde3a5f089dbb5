"""Callback: what a run tells as it goes, for the built-in outputs (console lines, metrics.jsonl and
TensorBoard, Ray metrics) and for yours (MLflow, W&B, your own logging).

Every event is one dict record, the same that metrics.jsonl holds, with its kind in "event":

    step            every optimizer step: epoch, step, loss, samples, samples_per_s, split (sizes by
                    wire position), replicas (names by wire position), running_loss, seconds_per_step
    epoch           epoch, loss, eval_loss, eval_accuracy, steps, samples, epoch_time_s, samples_per_s
    eval            an evaluation inside an epoch (eval_every): epoch, step, eval_loss, eval_accuracy
    checkpoint      step, path
    replica_lost    a loss and its recovery: replicas, cause, step, replaced, dropped, recovery_s, ...
    step_skipped, early_stop, replica_joined, replicas_moved: the rarer ones

`on_record` receives them all and hands each to its hook (`on_step`, `on_epoch`, `on_eval`,
`on_checkpoint`, `on_replica_lost`); override the hooks you need, or `on_record` for everything.
`on_start` comes once the config is resolved and the replicas are up; `on_end` after the final
model is written (with the result), or with None when the run stops on an error or a signal.

A callback runs in the driver, between the steps it reports on: keep it quick (buffer what goes
over a network). One that raises is reported on the console and left out for the rest of the run:
a tracker that goes away does not take the training with it.

    class Print(raytorch.Callback):
        def on_epoch(self, record):
            print(record["epoch"], record["loss"])

    Trainer(config, ..., callbacks=[Print()])      # or: raytorch train --callback mypkg.mod:Print
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..config.imports import imported
from ..config.recipes import BUILT_IN_CALLBACKS
from ..errors import ConfigError


class Callback:
    """Hooks a run calls as it goes; each does nothing unless overridden."""

    def on_start(self, run: dict) -> None:
        """The run is about to train: run_name, config (the resolved TrainConfig as a dict), run_dir
        (None without output_dir), replicas (one dict each: rank, device, node_id, pid, wire)."""

    def on_step(self, record: dict) -> None:
        """One optimizer step's record."""

    def on_steps(self, records: list[dict]) -> None:
        """The steps one gathering of losses brought (several per call where steps are short);
        by default on_step for each. Override it to take them in one go."""
        for record in records:
            self.on_step(record)

    def on_epoch(self, record: dict) -> None:
        """An epoch's end (after its evaluation)."""

    def on_eval(self, record: dict) -> None:
        """An evaluation inside an epoch (eval_every)."""

    def on_checkpoint(self, record: dict) -> None:
        """A checkpoint was written (record["path"])."""

    def on_replica_lost(self, record: dict) -> None:
        """Replicas were lost and the run recovered (record["recovery_s"] once the redone step is
        done; "phase" instead of a step where the loss came before training)."""

    def on_record(self, record: dict) -> None:
        """Every record but the steps' (which go to on_steps); hands it to its hook."""
        hook = HOOKS.get(record["event"])
        if hook is not None:
            getattr(self, hook)(record)

    def on_end(self, result: Optional[Any]) -> None:
        """The run is over: its TrainResult, or None where it stopped on an error or a signal."""


HOOKS = {"epoch": "on_epoch", "eval": "on_eval", "checkpoint": "on_checkpoint", "replica_lost": "on_replica_lost"}


class Callbacks:
    """The run's callbacks, built-in first, called in order; one that raises is dropped with a
    console line."""

    def __init__(self, say: Callable[[str], None], callbacks: tuple = ()):
        self.say = say
        self.active: list[Callback] = list(callbacks)

    def add(self, callback: Callback, first: bool = False) -> None:
        self.active.insert(0 if first else len(self.active), callback)

    def call(self, hook: str, *args: Any) -> None:
        for callback in list(self.active):
            try:
                getattr(callback, hook)(*args)
            except Exception as e:  # noqa: BLE001 -- any error of someone else's code: drop it, train on
                if getattr(callback, "essential", False):  # raytorch's own run directory: the run stops
                    raise
                self.active.remove(callback)
                self.say(f"callback {type(callback).__name__} failed in {hook}: {type(e).__name__}: {e}; "
                         "left out for the rest of the run")


def named_callback(spec: str) -> Callback:
    """The callback a config names: 'mlflow', 'wandb', or pkg.module:Class (made with no arguments)."""
    path = BUILT_IN_CALLBACKS.get(spec, spec)  # a built-in name stands for an import path (trackers.py's)
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError("callbacks", f"{spec!r}: give 'mlflow', 'wandb' or pkg.module:Class")
    try:
        made = imported(path)()  # a tracker's missing package: its ConfigError, as it says it
    except (ImportError, AttributeError) as e:
        raise ConfigError("callbacks", f"{spec!r} cannot be imported: {e}") from e
    if not isinstance(made, Callback):
        raise ConfigError("callbacks", f"{spec!r} made a {type(made).__name__}, not a raytorch.Callback subclass")
    return made
