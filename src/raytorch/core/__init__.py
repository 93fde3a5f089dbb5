"""Core: the training contract's pure logic, plain functions and records tested without Ray.
Which samples form each global batch and go to which replica (sharding), how gradients and losses
are weighted (reduce), the adaptive split by speed (balance), the run's arithmetic over epochs and
steps (runplan), what each call tells each replica (callplan), where a run stands (position), a
replica's state (snapshot), what a run returns (result), and the names of replicas (naming).

Imports: `raytorch.errors`, `raytorch.config`; torch and numpy; never Ray."""
