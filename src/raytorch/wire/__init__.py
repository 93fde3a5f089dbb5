"""Wire: how gradients travel between the replicas, the transport half of the all-reduce. The Wire
protocol a replica calls on any wire (protocol.py), the object-store, shared-memory and collective
(gloo, NCCL) wires, the sharded update on shared memory, and the choice of wire with its reasons.
A wire knows buffers, steps and peers, nothing of the replica's Learner (the replica sets a wire up
for its learner: replica/wiring.py).

Imports: `raytorch.errors`, `raytorch.config`, `raytorch.core`; nothing above them."""
