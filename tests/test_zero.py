"""The sharded update (wire/sharded.py): each replica steps its chunk of the parameters, every replica
takes every chunk. Replicas as threads on the shared-memory wire: no Ray."""

import threading

import numpy as np
import pytest
import torch

from raytorch.core.reduce import weighted_sum
from raytorch.wire.choice import shared_memory_available
from raytorch.wire.protocol import PeerFailed
from raytorch.wire.sharded import ShardedUpdate, chunk_slices, shared_names, why_not
from raytorch.wire.shared_memory import SharedMemoryWire

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
    assert why_not(torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True), params, flat, **check) is None
    assert why_not(torch.optim.Adam(params, amsgrad=True), params, flat, **check) is None
    assert why_not(torch.optim.AdamW(params), params, flat, **check) is None
    assert "this one is RMSprop" in why_not(torch.optim.RMSprop(params), params, flat, **check)
    assert "without dampening" in why_not(torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1), params, flat,
                                          **check)
    assert "not fused" in why_not(torch.optim.Adam(params, fused=True), params, flat, **check)
    assert "every trainable parameter" in why_not(torch.optim.SGD(params[:2], lr=0.1), params, flat, **check)
    assert "clipping" in why_not(two_groups(m), params, flat, **{**check, "grad_clip": 1.0})
    assert "BatchNorm" in why_not(two_groups(m), params, flat, **{**check, "statistics": True})
    assert shared_names(two_groups(m)) == ["params"]
    assert shared_names(torch.optim.Adam(params, amsgrad=True)) == ["params", "exp_avg", "exp_avg_sq",
                                                                     "max_exp_avg_sq"]


def momentum(m):
    """SGD with momentum (Nesterov) in one group, plain in the other."""
    weights, biases = [m[0].weight, m[2].weight], [m[0].bias, m[2].bias]
    return torch.optim.SGD([{"params": weights, "momentum": 0.9, "nesterov": True}, {"params": biases}], lr=0.05)


def adam(m):
    """Adam with weight decay and AMSGrad on the weights, plain on the biases."""
    weights, biases = [m[0].weight, m[2].weight], [m[0].bias, m[2].bias]
    return torch.optim.Adam([{"params": weights, "weight_decay": 0.1, "amsgrad": True}, {"params": biases}], lr=0.05)


def adamw(m):
    return torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1)


OPTIMIZERS = {"sgd": two_groups, "momentum": momentum, "adam": adam, "adamw": adamw}


def sharded_replicas(request, world, make_optimizer=two_groups):
    """`world` replicas (model, optimizer, wire, sharded update), wired together."""
    numel = flat_of(model()).numel()
    prefix = f"raytorch-test-{request.node.name}-{world}"
    models = [model() for _ in range(world)]
    optimizers = [make_optimizer(m) for m in models]
    wires = [SharedMemoryWire(r, numel, np.float32, prefix, world=world, shared=shared_names(optimizers[r]))
             for r in range(world)]
    for w in wires:
        w.attach({r: w.paths for r, w in enumerate(wires)}, {})
    for w in wires:
        w.unlink()
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
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("world", [3, 5])
def test_a_sharded_update_gives_every_replica_the_bits_of_one_process(request, world, name):
    """Four steps (both buffers twice, one skipped as non-finite), the lr moved between steps as a
    schedule does: every replica's model equals one process's optimizer on the reduced gradient,
    bit for bit, and so does its optimizer's state as state_dict reads it (what a snapshot or a
    checkpoint holds). The model's 120 elements make 2 blocks: with W = 5 three chunks are empty."""
    make_optimizer = OPTIMIZERS[name]
    models, optimizers, wires, updates = sharded_replicas(request, world, make_optimizer)
    reference = model()
    ref_opt = make_optimizer(reference)
    generator = torch.Generator().manual_seed(world)
    numel = wires[0].own.grads[0].size
    for step, finite in enumerate([True, False, True, True]):
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
        for m, o, w in zip(models, optimizers, wires):
            shared = torch.from_numpy(w.shared["params"][step % 2])  # each wire's mapping of the one buffer
            for p, q in zip(m.parameters(), reference.parameters()):
                assert torch.equal(p, q)
                # no copy: every model's parameters are views of the buffer all replicas stepped
                assert shared.data_ptr() <= p.data_ptr() < shared.data_ptr() + shared.nbytes
            assert_same_state(o, ref_opt)
    # released (the wire goes, or a state is loaded): each replica its own again, the same numbers
    updates[1].release()
    assert all(torch.equal(p, q) for p, q in zip(models[1].parameters(), reference.parameters()))
    assert_same_state(optimizers[1], ref_opt)
    with torch.no_grad():
        next(models[1].parameters()).add_(1.0)
        for entry in optimizers[1].state.values():
            for value in entry.values():
                value.add_(1.0)
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), reference.parameters()))
    assert_same_state(optimizers[0], ref_opt)


def assert_same_state(optimizer, reference):
    ours, theirs = optimizer.state_dict()["state"], reference.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index, entry in theirs.items():
        assert ours[index].keys() == entry.keys(), index
        for key, value in entry.items():
            assert torch.equal(ours[index][key], value), (index, key)


@needs_shm
def test_a_peer_lost_before_its_chunk_leaves_every_model_whole(request):
    """Adam. Step 0 goes through (the models and the optimizer's state now live in the shared
    buffers of step 0); at step 1 replica 2 fails after the reduce-scatter, before it steps its
    chunk: the others stop (PeerFailed) with their models and state at step 0, not part stepped."""
    world = 4
    models, optimizers, wires, updates = sharded_replicas(request, world, adam)
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
    state_0 = {i: {k: v.clone() for k, v in e.items()} for i, e in optimizers[0].state_dict()["state"].items()}
    errors = run_threads(lambda r: replica(r, 1), world)
    assert sorted(r for r, _ in errors) == [0, 1, 3] and all(isinstance(e, PeerFailed) for _, e in errors)
    for r in (0, 1, 3):
        assert all(torch.equal(p, q) for p, q in zip(models[r].parameters(), after_0))
        state = optimizers[r].state_dict()["state"]
        assert all(torch.equal(state[i][k], v) for i, e in state_0.items() for k, v in e.items())
