"""Setting up how gradients travel between the replicas (TrainConfig.reduction): the choice of
wire with its reasons, and the calls that connect every replica to it."""

from __future__ import annotations

from ..config.schema import TrainConfig
from ..errors import ClusterError, ConfigError
from ..replica.device import whole_gpus
from ..replica.replies import ReplicaInfo
from ..wire.choice import choose, shared_memory_shortfall
from ..wire.shared_memory import PEER_TIMEOUT_S
from .errors import gather


def connect_wire(config: TrainConfig, actors: list, infos: list[ReplicaInfo], prefix: str) -> tuple[str, str]:
    """Pick how gradients travel (see TrainConfig.reduction) and set it up; returns its name and why.
    A collective group's operations time out PEER_TIMEOUT_S past step_timeout: the driver finds a
    hung replica (and names it) before its peers' all-reduce gives up on it."""
    on_gpus = whole_gpus(config, [info.rank for info in infos])
    group = ("shard full: FSDP2 gathers parameters and reduce-scatters gradients" if config.shard == "full" else
             "sync_batchnorm: batch statistics and gradients" if config.sync_batchnorm else
             "grad_dtype bf16: gradients in bfloat16" if config.grad_dtype == "bf16" else None)
    try:
        wire, why = choose(config.reduction, len({info.node_id for info in infos}),
                           all(info.shared_memory for info in infos), on_gpus, group,
                           shared_memory_shortfall(infos))
    except ValueError as e:
        raise ClusterError(str(e)) from e
    if wire == "collective":  # a fresh group: the first replica's node hosts the rendezvous
        address, port = gather(actors[:1], [actors[0].rendezvous.remote()])[0]
        backend, timeout = "nccl" if on_gpus else "gloo", config.step_timeout + PEER_TIMEOUT_S
        gather(actors, [a.join_collective.remote(p, len(actors), address, port, timeout, backend, config.grad_dtype)
                        for p, a in enumerate(actors)])
        if config.grad_dtype == "bf16" and "bfloat16" not in why:  # not said yet by the group's reason
            why += "; gradients in bfloat16 on the wire"
    elif wire == "object_store":
        gather(actors, [a.use_object_store.remote() for a in actors])
    else:
        shared = gather(actors, [a.share_memory.remote(prefix, p, len(actors)) for p, a in enumerate(actors)])
        paths, unsharded = [replica_paths for replica_paths, _ in shared], shared[0][1]
        if config.shard == "optimizer" and unsharded not in (None, "one replica"):
            raise ConfigError("shard", f"'optimizer' cannot shard this run's update: {unsharded}; set shard to 'none'")
        if len(actors) > 2 or config.shard == "optimizer":  # the same config everywhere: the same answer
            why += ("; each replica steps its own 1/W of the parameters and optimizer state (sharded update)"
                    if unsharded is None
                    else f"; every replica steps all the parameters ({unsharded})")
        pids = {position: info.pid for position, info in enumerate(infos)}
        gather(actors, [a.attach_peers.remote(dict(enumerate(paths)), pids) for a in actors])
        gather(actors, [a.unlink_shared.remote() for a in actors])
    return wire, why
