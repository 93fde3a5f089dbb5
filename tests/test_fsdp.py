"""shard 'full' (replica/fsdp.py): parameters, gradients and optimizer state sharded by FSDP2 over
the replicas, and still the run one process computes. The contract on Ray against plain PyTorch
(reference.py) at W = 1 to 4 with SGD, Adam and AdamW, clipping, accumulation, replicas without
samples, evaluation and a resume onto another W; what sharding refuses, at start, in one line."""

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from raytorch import ConfigError, TrainConfig, Trainer
from raytorch.driver.policy import Failure, RecoveryPolicy
from raytorch.persist.checkpoint import listed
from raytorch.replica.fsdp import default_blocks, refusal
from reference import assert_same_parameters, train_reference


def mlp():
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


class Tower(nn.Module):
    """An embedding, a list of blocks and a head: the blocks are the units."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def data(n=37):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g)
    return torch.utils.data.TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))


def test_default_blocks_are_the_largest_lists_children_else_the_direct_ones():
    tower = Tower()
    assert default_blocks(tower) == list(tower.blocks)
    seq = mlp()
    assert default_blocks(seq) == [seq[0], seq[2], seq[4]]  # the Tanhs hold no parameter
    assert default_blocks(nn.Linear(2, 1)) == []


def test_what_full_sharding_refuses_on_the_model():
    assert refusal(Tower()) is None
    field, why = refusal(nn.Linear(2, 1))
    assert field == "shard_blocks" and "no submodule with parameters" in why
    field, why = refusal(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))
    assert field == "shard" and "BatchNorm" in why and "GroupNorm" in why
    tower = Tower()
    assert refusal(tower, lambda m: [m]) == ("shard_blocks", "shard_blocks(model) must return submodules of the "
                                                             "model (not the model itself)")
    assert refusal(tower, lambda m: [m.head, m.embed]) is None


@pytest.mark.parametrize("changes, field", [
    ({"reduction": "object_store"}, "reduction"), ({"reduction": "shared_memory"}, "reduction"),
    ({"precision": "fp16"}, "precision"), ({"spares": 1}, "spares"), ({"max_workers": 3}, "max_workers"),
    ({"sync_batchnorm": True}, "sync_batchnorm"), ({"grad_dtype": "bf16"}, "grad_dtype"),
    ({"compile": True}, "compile"),
])
def test_full_sharding_refuses_what_it_cannot_carry_in_one_line(changes, field):
    with pytest.raises(ConfigError, match=f"^{field}: with shard 'full': ") as raised:
        TrainConfig(shard="full", **changes)
    assert "\n" not in str(raised.value)


def test_shard_options_that_need_another_setting_say_which():
    with pytest.raises(ConfigError, match="shard_blocks: .*set shard to 'full'"):
        TrainConfig(shard_blocks="pkg.mod:blocks")
    with pytest.raises(ConfigError, match="shard: 'optimizer' shards the update on the shared-memory wire"):
        TrainConfig(shard="optimizer", reduction="collective")
    assert TrainConfig(shard="full", shard_blocks="pkg.mod:blocks").shard_blocks == "pkg.mod:blocks"


def test_a_lost_replica_stops_a_fully_sharded_run_and_is_not_retried():
    policy = RecoveryPolicy(sharded=True)
    decision = policy.decide(Failure(lost="replica-1 died", replicas=["replica-1"], attempt=0, survivors=2, step=4,
                                     previous=None))
    assert not decision.recover and "only copy of its shard" in decision.reason
    error = ValueError("boom")
    error.rank = 1
    assert not policy.retries(error, workers=3) and RecoveryPolicy().retries(error, workers=3)


def fit(workers, model_fn=mlp, **changes):
    settings = {"shard": "full", "epochs": 2, "batch_size": 10, "lr": 0.01, "optimizer": "adam",
                "lr_schedule": "constant", "cpus_per_replica": 1.0 if workers < 3 else 0.5, **changes}
    config = TrainConfig(workers=workers, **settings)
    result = Trainer(config, model_fn=model_fn, loss_fn=nn.functional.mse_loss, dataset_fn=data, quiet=True,
                     eval_dataset_fn=lambda: data(3)).fit()  # 3 eval samples: at W = 4 a replica scores none
    return config, result


def reference(config, model_fn=mlp):
    return train_reference(model_fn, data(), nn.functional.mse_loss, seed=config.seed, epochs=config.epochs,
                           batch_size=config.step_batch, lr=config.lr, optimizer=config.optimizer,
                           grad_clip=config.grad_clip, weight_decay=config.weight_decay)


@pytest.mark.parametrize("workers, changes", [
    (1, {"optimizer": "sgd"}),
    (2, {"grad_clip": 0.05}),  # clipping by the global norm: the norm of every shard together
    (3, {"optimizer": "adamw", "weight_decay": 0.1, "accumulate": 3}),
    # a last batch of 1 sample: three replicas take part in each forward and backward with none
    (4, {"batch_size": 4, "eval_every": 3}),
])
def test_fully_sharded_training_is_one_process_training(ray_local, workers, changes):
    config, result = fit(workers, model_fn=Tower, **changes)
    expected, losses = reference(config, model_fn=Tower)
    assert_same_parameters(result.model, expected, rel=2e-5)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    assert len(set(result.replica_digests)) == 1
    if config.eval_every:
        x, y = data(3).tensors
        assert result.eval_losses[-1] == pytest.approx(nn.functional.mse_loss(expected(x), y).item(), rel=1e-5)
    # each replica holds its shard: together the whole model, never more than a shard of it each
    whole = sum(p.numel() * 4 for p in expected.parameters())
    held = [memory["params"] for memory in result.replica_memory]
    assert sum(held) == whole and (workers == 1 or max(held) < whole)


def test_a_fully_sharded_run_resumes_onto_another_number_of_replicas(ray_local, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(workers=3, cpus_per_replica=0.5, shard="full", epochs=3, batch_size=10, lr=0.01,
                         optimizer="adam", lr_schedule="constant", output_dir=str(run), checkpoint_every=5)
    Trainer(config, model_fn=Tower, loss_fn=nn.functional.mse_loss, dataset_fn=data, quiet=True).fit()
    assert len(listed(run)) > 1
    for newer in listed(run)[:-1]:  # as if it had died after its oldest kept checkpoint
        Path(newer).unlink()
    resumed = dataclasses.replace(config, workers=2, cpus_per_replica=1.0)
    result = Trainer(resumed, model_fn=Tower, loss_fn=nn.functional.mse_loss, dataset_fn=data, quiet=True,
                     resume_from=str(run)).fit()
    expected, losses = reference(resumed, model_fn=Tower)
    assert result.steps == 12 and result.restarts == []
    assert_same_parameters(result.model, expected, rel=2e-5)
    assert result.epoch_losses[-1] == pytest.approx(losses[-1], rel=1e-5)


def test_a_state_of_views_travels_as_its_own_bytes_not_its_buffers():
    # a sharded update's parameters are views of one shared buffer: pickled as they are, each view
    # would carry the whole buffer (the largest replica held 4 GiB more for a 128 MiB model)
    import pickle

    from raytorch.core.snapshot import compact

    buffer = torch.arange(4096, dtype=torch.float32)
    state = {"a": buffer[:1024].view(32, 32), "b": buffer[1024:2048], "c": [buffer[2048:]], "own": torch.ones(8)}
    packed = compact(state)
    assert len(pickle.dumps(packed)) < 2 * 4096 * 4 < len(pickle.dumps(state))
    assert all(torch.equal(packed[k], state[k]) for k in ("a", "b", "own")) and packed["own"] is state["own"]
    assert torch.equal(packed["c"][0], buffer[2048:])


def test_shard_optimizer_steps_each_half_on_two_replicas_and_is_one_process_training(ray_local):
    config, result = fit(2, model_fn=Tower, shard="optimizer", reduction="shared_memory", optimizer="sgd")
    expected, losses = reference(config, model_fn=Tower)
    assert_same_parameters(result.model, expected, rel=2e-5)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
