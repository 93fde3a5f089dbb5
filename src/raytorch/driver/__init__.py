"""Driver: the run itself. `Trainer.fit` checks what can fail early (preflight), builds the
starting point, opens a Ray session and the replica group, and runs `EpochLoop.run` (the phases
of an epoch), whose `StepPipeline` keeps calls in flight and gathers the losses; a lost replica is
recovered without leaving the loop (`policy.py` decides, `recovery.py` acts); a signal stops the
run between calls with a checkpoint (`signals.py`).

Imports: raytorch's errors, config, core, data, persist, output, replica (device choice, the
model's checks), group; never Ray (the group is its only way to the replicas)."""
