"""The sharded update (zero.py): each replica steps its chunk of the parameters, every replica
takes every chunk. Replicas as threads on the shared-memory wire: no Ray."""

import threading

import numpy as np
import pytest
import torch

from raytorch.reduce import weighted_sum
from raytorch.wire import PeerFailed, SharedMemoryWire, shared_memory_available
from raytorch.zero import ShardedUpdate, chunk_slices, why_not

needs_shm = pytest.mark.skipif(not shared_memory_available(), reason="needs /dev/shm on x86")


def test_chunk_slices_cut_parameters_at_chunk_bounds():
    # parameters of 3, 5 and 2 elements; chunk [2, 9) takes the end of the first, all of the
    # second, the start of the third; elements past the parameters (statistics) are left out
    assert chunk_slices([3, 5, 2], 2, 9) == [(0, 2, 3, 0), (1, 0, 5, 1), (2, 0, 1, 6)]
    assert chunk_slices([3, 5, 2], 0, 3) == [(0, 0, 3, 0)]
    assert chunk_slices([3, 5, 2], 8, 14) == [(2, 0, 2, 0)]
    assert chunk_slices([3, 5, 2], 10, 14) == [] and chunk_slices([3], 2, 2) == []


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def two_groups(m):
    """SGD with two parameter groups: weight decay on the weights, another lr for the biases."""
    weights, biases = [m[0].weight, m[2].weight], [m[0].bias, m[2].bias]
    return torch.optim.SGD([{"params": weights, "weight_decay": 0.1}, {"params": biases, "lr": 0.3}], lr=0.05)


def flat_of(m):
    return torch.zeros(sum(p.numel() for p in m.parameters()))


def test_why_not_names_what_keeps_the_update_whole():
    m = model()
    params, flat = list(m.parameters()), flat_of(m)
    check = dict(statistics=False, grad_clip=None, scaled=False)
    assert why_not(two_groups(m), params, flat, **check) is None
    assert "keeps state" in why_not(torch.optim.SGD(params, lr=0.1, momentum=0.9), params, flat, **check)
    assert "keeps state" in why_not(torch.optim.Adam(params), params, flat, **check)
    assert "every trainable parameter" in why_not(torch.optim.SGD(params[:2], lr=0.1), params, flat, **check)
    assert "clipping" in why_not(two_groups(m), params, flat, **{**check, "grad_clip": 1.0})
    assert "BatchNorm" in why_not(two_groups(m), params, flat, **{**check, "statistics": True})


def sharded_replicas(request, world):
    """`world` replicas (model, optimizer, wire, sharded update), wired together."""
    m = model()
    numel = flat_of(m).numel()
    prefix = f"raytorch-test-{request.node.name}-{world}"
    wires = [SharedMemoryWire(r, numel, np.float32, prefix, world=world, sharded=True) for r in range(world)]
    for w in wires:
        w.attach({r: w.paths for r, w in enumerate(wires)}, {})
    for w in wires:
        w.unlink()
    models = [model() for _ in range(world)]
    optimizers = [two_groups(m) for m in models]
    updates = [ShardedUpdate(o, list(m.parameters()), w.chunks, r)
               for r, (m, o, w) in enumerate(zip(models, optimizers, wires))]
    return models, optimizers, wires, updates


def run_threads(target, world):
    errors = []

    def guarded(r):
        try:
            target(r)
        except Exception as e:  # noqa: BLE001
            errors.append((r, e))

    threads = [threading.Thread(target=guarded, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return errors


@needs_shm
@pytest.mark.parametrize("world", [3, 5])
def test_sharded_sgd_gives_every_replica_the_bits_of_one_process(request, world):
    """Three steps (both buffers, and one skipped as non-finite), the lr moved between steps as a
    schedule does: every replica's model equals one process's SGD on the reduced gradient, bit for
    bit (the model's 120 elements make 2 blocks: with W = 5 three chunks are empty)."""
    models, optimizers, wires, updates = sharded_replicas(request, world)
    reference = model()
    ref_opt = two_groups(reference)
    generator = torch.Generator().manual_seed(world)
    numel = wires[0].own.grads[0].size
    for step, finite in enumerate([True, False, True]):
        grads = [torch.randn(numel, generator=generator) for _ in range(world)]
        weights = [1 / world] * world
        for o in optimizers + [ref_opt]:
            o.param_groups[0]["lr"] = 0.05 / (step + 1)
        summed = weighted_sum([g.numpy() for g in grads], weights, out=torch.empty(numel))
        if finite:
            offset = 0
            for p in reference.parameters():
                p.grad = summed[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            ref_opt.step()

        def replica(r):
            wires[r].publish(grads[r], step, loss=1.0)
            _, chunk = wires[r].reduce_scatter([(q, step) for q in range(world)], weights, weights)
            wires[r].applied(step)
            updates[r].apply(wires[r], step, chunk, finite)

        assert run_threads(replica, world) == []
        for m, w in zip(models, wires):
            shared = torch.from_numpy(w.params[step % 2])  # each wire's mapping of the one buffer
            for p, q in zip(m.parameters(), reference.parameters()):
                assert torch.equal(p, q)
                # no copy: every model's parameters are views of the buffer all replicas stepped
                assert shared.data_ptr() <= p.data_ptr() < shared.data_ptr() + shared.nbytes
    # released (the wire goes, or a state is loaded): each model its own again, the same numbers
    updates[1].release()
    assert all(torch.equal(p, q) for p, q in zip(models[1].parameters(), reference.parameters()))
    with torch.no_grad():
        next(models[1].parameters()).add_(1.0)
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), reference.parameters()))


@needs_shm
def test_a_peer_lost_before_its_chunk_leaves_every_model_whole(request):
    """Step 0 goes through (the models now live in the shared buffer of step 0); at step 1
    replica 2 fails after the reduce-scatter, before it steps its chunk: the others stop
    (PeerFailed) with their models at step 0, not part stepped."""
    world = 4
    models, _, wires, updates = sharded_replicas(request, world)
    numel = wires[0].own.grads[0].size

    def replica(r, step):
        wires[r].publish(torch.ones(numel), step, loss=1.0)
        _, chunk = wires[r].reduce_scatter([(q, step) for q in range(world)], [0.25] * world, [0.25] * world)
        wires[r].applied(step)
        if r == 2 and step == 1:
            wires[r].fail()
            return
        updates[r].apply(wires[r], step, chunk, True)

    assert run_threads(lambda r: replica(r, 0), world) == []
    after_0 = [p.detach().clone() for p in models[0].parameters()]
    errors = run_threads(lambda r: replica(r, 1), world)
    assert sorted(r for r, _ in errors) == [0, 1, 3] and all(isinstance(e, PeerFailed) for _, e in errors)
    for r in (0, 1, 3):
        assert all(torch.equal(p, q) for p, q in zip(models[r].parameters(), after_0))
