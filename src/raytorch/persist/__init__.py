"""Persist: what outlives a run's processes. Checkpoints in a run directory, written atomically,
checked by a checksum and pruned to the newest K, resumed by a later run that must match the
run-defining config (checkpoint.py); where a run directory lives, a local path or an fsspec URL
staged locally and mirrored (storage.py).

Imports: `raytorch.errors`, `raytorch.config`, `raytorch.core`; never Ray."""
