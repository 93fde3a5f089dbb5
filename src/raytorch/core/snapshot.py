"""Snapshot: everything a replica's next steps depend on, one schema for the replica that takes it,
the replica that restores it, recovery and checkpoints alike. Pure: no Ray."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


def digest(tensors) -> str:
    """SHA-256 of the tensors' bytes, in order (any dtype, bf16 too): equal digests, equal bits."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compact(value: Any) -> Any:
    """`value` (a tensor, or dicts, lists and tuples of them) with every tensor that views a larger
    storage copied into one of its own size. Pickling a tensor (Ray sends a snapshot so) writes its
    whole storage: the parameters of a sharded update are views of one model-sized buffer, so a
    model's 16 views would travel, and be held, as 16 models (2 GiB for 128 MiB here)."""
    if torch.is_tensor(value):
        own = value.numel() * value.element_size()
        return value if value.untyped_storage().nbytes() <= own else value.clone()
    if isinstance(value, dict):
        return {key: compact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(compact(item) for item in value)
    return value


# What a checkpoint file holds of a snapshot, under these keys (the step count is the file's "step").
STATE_KEYS = ("model", "optimizer", "schedule", "rng", "scaler")


@dataclass(frozen=True)
class Snapshot:
    """A replica's state after `steps` applied updates."""

    model: dict[str, torch.Tensor]
    """The model's state_dict, on CPU."""
    optimizer: dict
    schedule: dict
    rng: torch.Tensor
    """torch's CPU generator state: dropout and other random ops go on as they would have."""
    scaler: Optional[dict]
    """The fp16 loss scaler's state (None without one)."""
    steps: int
    """Updates applied: the global step the next gradient belongs to."""
    losses: dict[int, float] = field(default_factory=dict)
    """Global loss of each applied step the replica still keeps (from the step asked for on): what
    the driver had not gathered when a peer died. Not part of a checkpoint."""

    def state(self) -> dict[str, Any]:
        """The keys a checkpoint file stores (the step count is its "step")."""
        return {key: getattr(self, key) for key in STATE_KEYS}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "Snapshot":
        return cls(**{key: saved.get(key) for key in STATE_KEYS}, steps=saved["step"])
