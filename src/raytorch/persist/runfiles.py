"""Whose files a run directory holds: a fresh run refuses a directory that holds another run's
files (or, with overwrite, removes them first); every start removes what interrupted writes left
(temporary files of a checkpoint that never got its name). Only raytorch's own names are touched:
a run directory may hold the user's files too."""

from __future__ import annotations

import re
from typing import Callable

from ..errors import ConfigError
from .storage import CHECKPOINTS, RunStorage

# What a run writes in its directory (output/, persist/): another run's, where a fresh run finds them.
RUN_FILES = frozenset({"config.yaml", "metrics.jsonl", "loss.png", "model.pt", "model.safetensors", "tensorboard",
                       "profile", CHECKPOINTS})
TEMPORARY = re.compile(r"^\.step-\d{9}\.pt(\.sha256)?\.[0-9a-f-]+\.tmp$")  # checkpoint.py's temporary names


def claim(storage: RunStorage, resuming: bool, overwrite: bool, say: Callable[[str], None]) -> None:
    """Make the run directory this run's: a resumed run's is its own; a fresh run's must hold no
    other run's files (a ConfigError saying what to do), or, with `overwrite`, they are removed."""
    if storage.url is None:
        return
    left = storage.remove_matching(CHECKPOINTS, TEMPORARY)
    if left:
        say(f"removed {len(left)} temporary file(s) of interrupted checkpoint writes: {', '.join(left)}")
    if resuming:
        return
    held = sorted(RUN_FILES & set(storage.names()))
    if not held:
        return
    if not overwrite:
        raise ConfigError("output_dir", f"{storage.url} holds another run's files ({', '.join(held)}): continue that "
                                        f"run with --resume {storage.url} (Trainer(resume_from=...)), replace it with "
                                        f"--overwrite (TrainConfig(overwrite=True)), or choose another output_dir")
    storage.remove(held)
    say(f"overwrite: removed the previous run's {', '.join(held)} from {storage.url}")
