"""Replica: one model replica, the Ray actor the replica group runs (actor.py), and what it is made
of: its Learner (the PyTorch half) and flat gradient, batches, device, synchronized BatchNorm,
profiler, optimizer and schedule, its process, the replica's side of setting up a wire, its Ray
metrics, and the typed records it answers the driver with.

Imports: `raytorch.errors`, `raytorch.config`, `raytorch.core`, the layer of compat, data,
persist, wire and tasks, and `raytorch.output`; never group or driver."""
