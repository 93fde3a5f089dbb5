"""The data and math halves of the contract, as pure functions: no Ray."""

import numpy as np
import pytest
import torch

from raytorch.core.reduce import batch_weights, weighted_mean, weighted_sum
from raytorch.core.sharding import epoch_order, global_batches, split_batch, steps_per_epoch


def test_epoch_order_is_the_contracts_randperm():
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 + 3))
    assert torch.equal(epoch_order(50, seed=7, epoch=3), expected)
    assert not torch.equal(epoch_order(50, seed=7, epoch=3), epoch_order(50, seed=7, epoch=4))
    assert torch.equal(epoch_order(5, seed=7, epoch=3, shuffle=False), torch.arange(5))


@pytest.mark.parametrize("size,batch,drop_last,expected", [(10, 3, False, 4), (10, 3, True, 3), (9, 3, False, 3),
                                                           (2, 3, True, 0), (2, 3, False, 1)])
def test_steps_per_epoch(size, batch, drop_last, expected):
    assert steps_per_epoch(size, batch, drop_last) == expected
    assert len(global_batches(torch.arange(size), batch, drop_last)) == expected


def test_global_batches_are_consecutive_slices_of_the_order():
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    batches = global_batches(order, 4)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), order)
    assert [len(b) for b in global_batches(order, 4, drop_last=True)] == [4, 4]


@pytest.mark.parametrize("n,w", [(10, 3), (9, 3), (2, 3), (1, 1), (100, 7), (0, 2)])
def test_split_batch_is_contiguous_and_near_equal(n, w):
    batch = torch.arange(100, 100 + n)
    parts = split_batch(batch, w)
    assert len(parts) == w
    assert torch.equal(torch.cat(parts), batch)  # contiguous, in order, nothing lost or repeated
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger parts come first


def test_short_batch_leaves_last_replicas_out():
    assert [len(p) for p in split_batch(torch.arange(2), 3)] == [1, 1, 0]


def test_weighted_gradients_equal_the_full_batch_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randn(10, 2)

    def grad(idx):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).numpy().copy()

    parts = split_batch(torch.arange(10), 3)
    grads = [grad(p) for p in parts]
    weights = batch_weights([len(p) for p in parts])
    out = torch.empty(len(grads[0]))
    weighted_sum(grads, weights, out)
    np.testing.assert_allclose(out.numpy(), grad(torch.arange(10)), rtol=1e-6, atol=1e-7)


def test_batch_weights_and_weighted_mean():
    assert batch_weights([3, 1]) == [0.75, 0.25]
    assert weighted_mean([1.0, 5.0], [3, 1]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        batch_weights([0, 0])


def test_weighted_sum_reads_read_only_inputs():
    a = np.arange(4, dtype=np.float32)
    a.setflags(write=False)
    out = torch.empty(4)
    weighted_sum([a, a], [0.5, 0.5], out)
    np.testing.assert_array_equal(out.numpy(), a)
