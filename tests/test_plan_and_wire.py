"""The per-call plan (pure) and the shared-memory wire's ordering, in-process: no Ray."""

import threading
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.distributed as dist

from raytorch.core.callplan import plan_steps, steps_per_call
from raytorch.core.reduce import chunk_bounds, weighted_sum
from raytorch.wire.choice import choose, shared_memory_available, shared_memory_shortfall
from raytorch.wire.collective import Buckets, buckets
from raytorch.wire.protocol import PeerFailed
from raytorch.wire.shared_memory import SharedMemoryWire


def test_plan_carries_each_steps_reduce_into_the_next_step():
    batches = [torch.arange(0, 5), torch.arange(5, 10), torch.arange(10, 12)]
    plans, sizes, carry = plan_steps(batches, workers=3, carry=None, wire="shared_memory", first_step=7)
    assert sizes == [[2, 2, 1], [2, 2, 1], [1, 1, 0]]
    assert [len(p) for p in plans] == [3, 3, 3]
    assert plans[2][2][0].tolist() == [] and plans[2][2][2] == 0.0  # replica 2 sits out the short last step
    assert plans[0][0][2] == pytest.approx(4 / 10)  # its share of the step's samples
    assert plans[0][0][1] is None  # nothing to apply before the first step
    weights, routes = plans[1][1][1]  # before step 8, replica 1 applies step 7's reduce
    assert weights == [0.4, 0.4, 0.2] and routes == [(0, 7), (1, 7), (2, 7)]
    assert carry == ([0.5, 0.5], [(0, 9), (1, 9)])  # step 9 had two active replicas


def test_object_store_plan_routes_by_position_one_step_per_call():
    plans, _, carry = plan_steps([torch.arange(4)], workers=2, carry=([1.0], [0]), wire="object_store", first_step=0)
    assert plans[0][0][1] == ([1.0], [0])
    assert carry == ([0.5, 0.5], [0, 1])
    with pytest.raises(ValueError):
        plan_steps([torch.arange(4)] * 2, workers=2, carry=None, wire="object_store", first_step=0)


def test_steps_per_call_amortizes_small_steps_only():
    assert steps_per_call("object_store", 1e-4) == 1
    assert steps_per_call("shared_memory", 0.0) == 1
    assert steps_per_call("shared_memory", 0.2) == 1
    assert steps_per_call("shared_memory", 5e-3) == 20
    assert steps_per_call("shared_memory", 1e-6) == 64
    assert steps_per_call("collective", 0.05) == 8  # calls cross nodes: longer ones


needs_shm = pytest.mark.skipif(not shared_memory_available(), reason="needs /dev/shm on x86")


def _pair(tmp_prefix):
    wires = [SharedMemoryWire(r, 4, np.float32, tmp_prefix, world=2) for r in range(2)]
    for w in wires:
        w.attach({0: wires[0].paths, 1: wires[1].paths}, {})
    for w in wires:
        w.unlink()
    return wires


@needs_shm
def test_shared_memory_wire_hands_over_alternating_buffers(request):
    a, b = _pair(f"raytorch-test-{request.node.name}")
    a.publish(torch.full((4,), 1.0), step=0, loss=0.5)
    b.publish(torch.full((4,), 2.0), step=0, loss=0.5)
    assert b.read((0, 0))[0].tolist() == [1.0] * 4 and a.read((1, 0))[0].tolist() == [2.0] * 4
    a.publish(torch.full((4,), 3.0), step=1, loss=1.5)  # the other buffer: step 0's is still readable
    assert b.read((0, 0))[0].tolist() == [1.0] * 4 and b.read((0, 1))[0].tolist() == [3.0] * 4
    assert b.read((0, 0))[1] == 0.5 and b.read((0, 1))[1] == 1.5  # each step's loss comes with it


@needs_shm
def test_fresh_buffers_for_a_replica_that_resumes_at_a_later_step(request):
    """After a recovery every replica is at step s: the counters start there, so nobody waits for
    steps before s."""
    prefix = f"raytorch-test-{request.node.name}"
    a, b = (SharedMemoryWire(r, 4, np.float32, prefix, step=40, world=2) for r in range(2))
    for w in (a, b):
        w.attach({0: a.paths, 1: b.paths}, {})
    for w in (a, b):
        w.unlink()
    a.publish(torch.full((4,), 1.0), step=40, loss=0.25)  # would wait for b to apply step 38 otherwise
    assert b.read((0, 40))[0].tolist() == [1.0] * 4


@needs_shm
def test_reader_waits_for_publish_and_writer_waits_for_readers(request):
    a, b = _pair(f"raytorch-test-{request.node.name}")
    got = []
    reader = threading.Thread(target=lambda: got.append(b.read((0, 0))[0].tolist()))
    reader.start()
    reader.join(timeout=0.2)
    assert reader.is_alive()  # nothing published yet: it waits
    a.publish(torch.full((4,), 5.0), step=0, loss=0.5)
    reader.join(timeout=5)
    assert got == [[5.0] * 4]
    a.publish(torch.full((4,), 6.0), step=1, loss=1.5)
    writer = threading.Thread(target=lambda: a.publish(torch.full((4,), 7.0), step=2, loss=2.5))
    writer.start()
    writer.join(timeout=0.2)
    assert writer.is_alive()  # b has not applied step 0, whose buffer step 2 reuses
    b.applied(0)
    writer.join(timeout=5)
    assert not writer.is_alive() and b.read((0, 2))[0].tolist() == [7.0] * 4


@needs_shm
def test_a_failed_peer_stops_the_wait(request):
    a, b = _pair(f"raytorch-test-{request.node.name}")
    a.fail()
    with pytest.raises(PeerFailed, match="replica 0 failed"):
        b.read((0, 3))


@pytest.mark.parametrize("numel", [1, 63, 64, 1000, 12_345])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_chunks_cover_the_buffer_in_order_on_block_boundaries(numel, parts):
    bounds = chunk_bounds(numel, parts)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))  # contiguous, in order
    assert all(lo <= hi and (lo % 64 == 0 or lo == hi) for lo, hi in bounds)  # a chunk starts on a block
    sizes = [hi - lo for lo, hi in bounds]
    filled = [size for size in sizes if size]
    whole = filled[:-1]  # the last non-empty chunk holds the remainder; empty ones come after it
    assert sizes[:len(filled)] == filled
    assert all(size % 64 == 0 for size in whole) and (not whole or max(whole) - min(whole) <= 64)
    assert filled[-1] <= max(filled)


@pytest.mark.parametrize("parts", [2, 3, 8])
def test_a_sum_chunk_by_chunk_has_the_bits_of_one_pass(parts):
    generator = torch.Generator().manual_seed(parts)
    grads = [torch.randn(100_003, generator=generator).numpy() for _ in range(3)]
    weights = [0.3, 0.45, 0.25]
    whole = weighted_sum(grads, weights, out=torch.empty(100_003))
    chunked = torch.empty(100_003)
    for lo, hi in chunk_bounds(100_003, parts):
        weighted_sum([g[lo:hi] for g in grads], weights, out=chunked[lo:hi])
    assert torch.equal(whole, chunked)


@needs_shm
@pytest.mark.parametrize("world", [1, 3, 5])
def test_reduce_scatter_all_gather_gives_every_replica_the_bits_of_a_plain_sum(request, world):
    """Replicas as threads, each with its own wire: the reduced gradient equals weighted_sum over
    the whole gradients, bit for bit, on every replica, for two steps in a row (both buffers)."""
    numel, prefix = 10_007, f"raytorch-test-{request.node.name}-{world}"
    wires = [SharedMemoryWire(r, numel, np.float32, prefix, world=world) for r in range(world)]
    paths = {r: w.paths for r, w in enumerate(wires)}
    for w in wires:
        w.attach(paths, {})
    for w in wires:
        w.unlink()
    generator = torch.Generator().manual_seed(world)
    for step in range(2):
        grads = [torch.randn(numel, generator=generator) for _ in range(world)]
        weights = [1 / world] * world
        expected = weighted_sum([g.numpy() for g in grads], weights, out=torch.empty(numel))
        outs = [torch.empty(numel) for _ in range(world)]
        losses = []

        def replica(r):
            wires[r].publish(grads[r], step, loss=float(r))
            losses.append(wires[r].all_reduce([(q, step) for q in range(world)], weights, weights, outs[r]))
            wires[r].applied(step)

        threads = [threading.Thread(target=replica, args=(r,)) for r in range(world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert all(torch.equal(out, expected) for out in outs)
        assert losses == [sum(q / world for q in range(world))] * world  # the local losses, weighted


def test_auto_picks_shared_memory_on_one_node_and_gloo_across_nodes():
    assert choose("auto", nodes=1, shared_memory=True)[0] == "shared_memory"
    wire, why = choose("auto", nodes=4, shared_memory=True)
    assert wire == "collective" and why.startswith("replicas on 4 nodes: a gloo ring all-reduce")
    assert choose("auto", nodes=1, shared_memory=False)[0] == "collective"  # not x86, or no /dev/shm
    assert choose("object_store", nodes=4, shared_memory=True) == ("object_store", "as asked")
    with pytest.raises(ValueError, match="'shared_memory' needs all replicas on one x86 node.*on 2 node"):
        choose("shared_memory", nodes=2, shared_memory=True)


class Room(NamedTuple):
    """What ReplicaInfo says of a replica's /dev/shm (wire.choice.ShmRoom)."""

    grad_bytes: int
    shared_buffers: int
    shm_free: int


def test_a_dev_shm_too_small_for_the_wire_picks_gloo_or_says_so_before_any_step():
    """The shared-memory wire's files are sparse: past /dev/shm's room a replica would die of SIGBUS
    mid-run. 4 replicas, 100 MiB of gradient: 2 gradients and 2 reduced chunks each (1,000 MiB),
    plus the sharded update's shared buffers (Adam: parameters and 2 moments, two of each: 600)."""
    mib = 2**20
    infos = [Room(grad_bytes=100 * mib, shared_buffers=6, shm_free=64 * mib)] * 4
    short = shared_memory_shortfall(infos)
    assert short.startswith("/dev/shm has 64 MiB free and the shared-memory wire of 4 replicas needs ~1,600 MiB")
    assert shared_memory_shortfall([i._replace(shm_free=1600 * mib) for i in infos]) is None
    assert shared_memory_shortfall([i._replace(shm_free=1599 * mib) for i in infos]) is not None
    # two replicas: no sharded update, no shared buffers (2 x (200 + 100) MiB)
    assert shared_memory_shortfall([i._replace(shm_free=600 * mib) for i in infos[:2]]) is None
    wire, why = choose("auto", nodes=1, shared_memory=True, short=short)
    assert wire == "collective" and why.startswith("/dev/shm has 64 MiB free") and "gloo" in why
    with pytest.raises(ValueError, match="'shared_memory' needs .* room in /dev/shm; /dev/shm has 64 MiB free"):
        choose("shared_memory", nodes=1, shared_memory=True, short=short)


def test_a_run_that_needs_a_process_group_gets_the_collective_wire_and_says_why():
    wire, why = choose("auto", nodes=1, shared_memory=True, group="grad_dtype bf16: gradients in bfloat16")
    assert (wire, why) == ("collective", "grad_dtype bf16: gradients in bfloat16: they travel on a gloo process group")


def test_auto_picks_nccl_where_every_replica_holds_a_whole_gpu():
    for nodes in (1, 3):
        wire, why = choose("auto", nodes=nodes, shared_memory=True, whole_gpus=True)
        assert wire == "collective" and "NCCL" in why
    # shared or no GPUs: the host wires (shared memory on one node, gloo across nodes)
    assert choose("auto", nodes=1, shared_memory=True, whole_gpus=False)[0] == "shared_memory"
    assert "gloo" in choose("auto", nodes=2, shared_memory=True, whole_gpus=False)[1]


def test_buckets_cover_the_gradient_from_the_last_parameter_back():
    bounds = [(0, 3), (3, 4), (4, 10), (10, 10), (10, 12)]  # a parameter with no element too
    assert buckets(bounds, most=5) == [(4, 12), (0, 4)]
    assert buckets(bounds, most=100) == [(0, 12)]
    assert buckets(bounds, most=1) == [(10, 12), (4, 10), (3, 4), (0, 3)]
    assert buckets([]) == []


def test_bf16_buckets_round_the_gradient_on_the_wire_and_keep_the_loss_exact(tmp_path):
    """grad_dtype bf16: each bucket is all-reduced as bfloat16 (here a group of one: the sum is the
    value), then copied back: the gradient comes back rounded to bfloat16, the loss (the buffer's
    last element) as it was; with no wire dtype nothing is rounded."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        bounds = [(0, 3), (3, 4), (4, 10)]
        values = torch.linspace(1.0, 2.0, 11, dtype=torch.float32) + 1e-3  # not bfloat16 numbers
        for wire_dtype in (torch.bfloat16, None):
            buffer = values.clone()
            group = Buckets(bounds, buffer, wire_dtype)
            group.begin()
            group.ready(2)  # the last parameter first: its bucket may start
            for index in (1, 0):
                group.ready(index)
            group.finish()
            rounded = values[:-1].to(torch.bfloat16).float() if wire_dtype else values[:-1]
            assert torch.equal(buffer[:-1], rounded)
            assert buffer[-1].item() == values[-1].item()
        assert not torch.equal(values[:-1].to(torch.bfloat16).float(), values[:-1])  # so the test can tell
    finally:
        dist.destroy_process_group()
