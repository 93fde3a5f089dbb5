"""Replica as a plain object, in-process: the flat gradient buffer and one step's arithmetic."""

import numpy as np
import pytest
import torch

from raytorch import TrainConfig
from raytorch.data.datasets import ArrayDataset
from raytorch.replica import flatgrad
from raytorch.replica.actor import Replica
from raytorch.replica.flatgrad import attach_flat_grad
from raytorch.tasks.builtin import linear_data, mlp


def test_grads_are_views_into_one_flat_buffer_through_backward():
    model = mlp(4, 2, hidden=8)
    flat = attach_flat_grad(model)
    for _ in range(2):  # backward accumulates in place: the views survive
        flat.zero_()
        model(torch.randn(5, 4)).sum().backward()
        for p in model.parameters():
            assert p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert torch.equal(flat, torch.cat([p.grad.flatten() for p in model.parameters()]))


@pytest.mark.parametrize("per_param", [0, 1 << 30], ids=["hooks", "in_place"])
def test_gradients_gathered_flat_as_backward_finishes_each_including_unused_ones(monkeypatch, per_param):
    """Both ways a gradient gets into the flat buffer (flatgrad.IN_PLACE_PER_PARAM picks by size)."""
    monkeypatch.setattr(flatgrad, "IN_PLACE_PER_PARAM", per_param)

    class Partly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 3), torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    config = TrainConfig(workers=1, batch_size=6, lr=0.1, optimizer="sgd", lr_schedule="constant", accumulate=2)
    data = linear_data(6, seed=0)
    x = torch.randn(6, 4)
    torch.manual_seed(0)
    replica = Replica(0, config, model_fn=Partly, loss_fn=lambda out, y: out.pow(2).mean() + 0 * y.sum(),
                      init_state=Partly().state_dict(), train_set=ArrayDataset(x.numpy(), np.asarray(data.y)),
                      eval_set=data, total_steps=1)
    assert replica.learner.grads.in_place == bool(per_param)
    replica.learner.flat_grad.fill_(7.0)  # stale: the unused parameters' part must come back zero
    ready = []
    replica.learner.grads.on_ready = ready.append
    replica.learner.gradient(np.arange(6), 1.0)
    reference = Partly()
    reference.load_state_dict(replica.model.state_dict())
    reference(x).pow(2).mean().backward()
    want = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in reference.parameters()])
    torch.testing.assert_close(replica.learner.flat_grad, want)
    assert sorted(ready) == [0, 1, 2, 3]  # every parameter once, the unused ones too
    for p in replica.model.parameters():  # the optimizer reads the flat buffer
        assert p.grad.untyped_storage().data_ptr() == replica.learner.flat_grad.untyped_storage().data_ptr()
    replica.model.zero_grad()  # a user's step may let the .grad go: the next gradient lands all the same
    out = torch.full_like(want, 3.0)
    replica.learner.gradient(np.arange(6), 1.0, into=out)
    torch.testing.assert_close(out, want)
    assert torch.isfinite(replica.learner.grads.checksum)
    with torch.no_grad():
        replica.model.used.weight[0, 0] = float("nan")
    replica.learner.gradient(np.arange(6), 1.0)
    assert not torch.isfinite(replica.learner.grads.checksum)  # NaN is caught either way


def _initial(config, model_fn):
    torch.manual_seed(config.seed)
    return model_fn().state_dict()


def _replica(rank, config, model_fn, data):
    return Replica(rank, config, model_fn=model_fn, loss_fn=torch.nn.functional.mse_loss,
                   init_state=_initial(config, model_fn),
                   train_set=data, eval_set=data, total_steps=10)


def test_two_replicas_step_like_one_process():
    config = TrainConfig(workers=2, batch_size=6, lr=1e-4, optimizer="sgd", lr_schedule="constant")
    data = linear_data(6, seed=0)
    model_fn = lambda: torch.nn.Linear(1, 1)  # noqa: E731
    replicas = [_replica(r, config, model_fn, data) for r in range(2)]
    results = [r.run([(np.arange(3 * i, 3 * i + 3), None, 0.5)]) for i, r in enumerate(replicas)]
    grads = [(g.copy(), loss) for (g, loss), _ in results]  # a view of its buffer and its loss; Ray would copy
    for r in replicas:
        r.apply(([0.5, 0.5], [0, 1]), *grads)

    torch.manual_seed(config.seed)
    model = model_fn()
    x, y = data.batch(np.arange(6))
    torch.nn.functional.mse_loss(model(x), y).backward()
    torch.optim.SGD(model.parameters(), lr=1e-4).step()
    for r in replicas:
        for got, want in zip(r.model.parameters(), model.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert replicas[0].digest() == replicas[1].digest()
    with torch.no_grad():
        start = model_fn()
        start.load_state_dict(_initial(config, model_fn))
        for i, (_, report) in enumerate(results):
            (loss,) = report.losses
            part = np.arange(3 * i, 3 * i + 3)
            px, py = data.batch(part)
            assert loss == pytest.approx(torch.nn.functional.mse_loss(start(px), py).item(), rel=1e-6)


def test_replica_without_samples_returns_nothing():
    config = TrainConfig(workers=3, batch_size=3)
    replica = _replica(0, config, lambda: torch.nn.Linear(1, 1), linear_data(4, seed=0))
    handoff, report = replica.run([(np.array([], dtype=np.int64), None, 0.0)])
    [(compute_s, other_s)] = report.seconds
    assert handoff is None and report.losses == [None] and compute_s == 0.0 and other_s >= 0.0


def test_evaluate_is_the_sample_mean_over_chunks():
    config = TrainConfig(workers=1, batch_size=1)
    data = linear_data(10, seed=1)
    replica = _replica(0, config, lambda: torch.nn.Linear(1, 1), data)
    x, y = data.batch(np.arange(10))
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(replica.model(x), y).item()
    loss, accuracy = replica.evaluate(np.arange(10), chunk=3)
    assert loss == pytest.approx(expected, rel=1e-5) and accuracy is None  # a regression: no accuracy
