"""Devices and precision, on CPU: 'auto' resolution, autocast (bf16 runs on CPU too), and the fp16
loss scaler, whose skip-or-step decisions every replica takes alike and one process takes too."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raytorch import ClusterError, TrainConfig, Trainer
from raytorch.core.callplan import plan_steps
from raytorch.core.sharding import global_batches
from raytorch.replica.actor import Replica
from raytorch.replica.device import resolve_device
from raytorch.tasks.builtin import linear_data, mlp
from reference import assert_same_parameters


def test_auto_takes_cuda_only_where_the_cluster_has_gpus():
    assert resolve_device(TrainConfig(device="auto"), {"CPU": 8.0}).device == "cpu"
    assert resolve_device(TrainConfig(device="auto"), {"CPU": 8.0, "GPU": 2.0}).gpus_of(0) == 1.0
    config = TrainConfig(device="cpu")
    assert resolve_device(config, {"CPU": 1.0, "GPU": 1.0}) is config  # an explicit choice stays
    with pytest.raises(ClusterError, match=r"device 'cuda' asked for, but the cluster has no GPU \(8 CPU, 0 GPU\)"):
        resolve_device(TrainConfig(device="cuda"), {"CPU": 8.0})


class Probe(torch.nn.Module):
    """A 4 -> 2 MLP that records the dtype its first layer computed in."""

    def __init__(self):
        super().__init__()
        self.net = mlp(4, 2, hidden=8)
        self.seen = set()

    def forward(self, x):
        hidden = self.net[0](x)
        self.seen.add(hidden.dtype)
        return self.net[1:](hidden)


def _data(n=24):
    rng = np.random.default_rng(0)
    from raytorch.data.datasets import ArrayDataset

    return ArrayDataset(rng.normal(size=(n, 4)).astype(np.float32), rng.normal(size=(n, 2)).astype(np.float32))


def _replicas(config, model_fn, data, workers):
    torch.manual_seed(config.seed)
    init = model_fn().state_dict()
    return [Replica(r, config, model_fn=model_fn, loss_fn=F.mse_loss, init_state=init, train_set=data, eval_set=None,
                    total_steps=100) for r in range(workers)]


def _train_in_process(replicas, data, config, steps):
    """The driver's plan, followed by in-process replicas over the object-store wire's arithmetic."""
    batches = global_batches(torch.arange(len(data)), config.batch_size)[:steps]
    carry, handoffs = None, []
    for k, batch in enumerate(batches):
        plans, sizes, carry = plan_steps([batch], len(replicas), carry, "object_store", k)
        handoffs = [r.run(plan, *handoffs)[0] for r, plan in zip(replicas, plans)]
        handoffs = [(g.copy(), loss) for g, loss in handoffs if g is not None]
    for r in replicas:
        r.apply(carry, *handoffs)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_autocast_runs_the_forward_in_the_asked_precision(precision, dtype):
    config = TrainConfig(workers=2, batch_size=8, lr=0.01, precision=precision, optimizer="adam")
    replicas = _replicas(config, Probe, _data(), 2)
    _train_in_process(replicas, _data(), config, steps=3)
    assert all(r.model.seen == {dtype} for r in replicas)
    assert replicas[0].digest() == replicas[1].digest()
    assert all(p.dtype == torch.float32 for p in replicas[0].model.parameters())  # master weights stay fp32


def test_fp16_loss_scaler_skips_the_same_steps_as_one_process():
    """Inputs up to 100 overflow fp16 gradients at the scaler's first scales (2**16, 2**15, ...): those
    steps are skipped and the scale backs off, on every replica and in one process alike."""
    data = linear_data(64, 0)
    config = TrainConfig(workers=2, batch_size=16, lr=1e-4, optimizer="sgd", precision="fp16")
    model_fn = partial(torch.nn.Linear, 1, 1)
    replicas = _replicas(config, model_fn, data, 2)
    _train_in_process(replicas, data, config, steps=4)

    torch.manual_seed(config.seed)
    model = model_fn()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu")
    scales = []
    for batch in global_batches(torch.arange(64), 16):
        x, y = data.batch(batch.numpy())
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales[0] < 2.0 ** 16  # the first step overflowed: skipped, scale halved
    for r in replicas:
        assert r.scaler.get_scale() == scaler.get_scale()
        assert_same_parameters(r.model, model, rel=1e-3)  # fp16 forward on half batches: not bit-equal
    assert replicas[0].digest() == replicas[1].digest()


def test_bf16_run_on_ray_converges_and_replicas_agree(ray_local):
    config = TrainConfig(workers=2, epochs=3, batch_size=32, lr=0.01, optimizer="adam", precision="bf16",
                         dataset="classification", model="mlp")
    from raytorch.tasks.builtin import DATASETS, MODELS

    task = DATASETS["classification"]
    result = Trainer(config, model_fn=partial(MODELS["mlp"], task.in_features, task.out_features),
                     dataset_fn=partial(task.train, 0), eval_dataset_fn=partial(task.eval, 0), loss_fn=task.loss,
                     quiet=True).fit()
    assert len(set(result.replica_digests)) == 1
    assert result.epoch_losses[-1] < 0.5 * result.epoch_losses[0]
