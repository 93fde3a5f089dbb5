"""The training contract: W replicas train exactly what one plain PyTorch process trains."""

import itertools
import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from raytorch import TrainConfig, Trainer
from raytorch.tasks.builtin import classification_data, linear, linear_data, mlp
from reference import assert_same_parameters, train_reference

# Sizes chosen so the dataset is a multiple of neither B nor W, and (linear, W=3) the last
# global batch has 2 samples: one replica sits that step out. The linear model's gradient is
# accumulated in place, the MLP's (~46 K elements a parameter) gathered by backward's hooks
# (flatgrad.IN_PLACE_PER_PARAM): the matrix runs both.
CASES = {
    "linear": dict(model_fn=partial(linear, 1, 1), data=partial(linear_data, 130, 3), loss_fn=F.mse_loss,
                   batch_size=32, lr={"sgd": 1e-4, "adam": 0.05}),
    "mlp": dict(model_fn=partial(mlp, 16, 4, 512), data=partial(classification_data, 302, 3), loss_fn=F.cross_entropy,
                batch_size=64, lr={"sgd": 0.1, "adam": 0.01}),
}


AXES = {"case": ["linear", "mlp"], "optimizer": ["sgd", "adam"], "workers": [1, 2, 3],
        "reduction": ["shared_memory", "collective", "object_store"]}


def matrix(full: bool) -> list[tuple]:
    """The runs of the contract: all 36 combinations of AXES where `full`, else 9 that hold every
    pair of values of any two axes (each wire with each W, each optimizer, each model; each W with
    each optimizer and model; ...): the rows of an orthogonal array L9(3^4), columns a, b, a + b and
    a + 2b (mod 3), the last two folded onto the two values of optimizer and model."""
    if full:
        return list(itertools.product(*AXES.values()))
    return [(AXES["case"][(a + 2 * b) % 3 % 2], AXES["optimizer"][(a + b) % 3 % 2], AXES["workers"][a],
             AXES["reduction"][b]) for a, b in itertools.product(range(3), range(3))]


def test_the_pairwise_matrix_holds_every_pair_of_values():
    rows = matrix(full=False)
    assert len(rows) == 9 and len(set(rows)) == 9 and set(rows) <= set(matrix(full=True))
    for i, j in itertools.combinations(range(len(AXES)), 2):
        values = list(AXES.values())
        assert {(row[i], row[j]) for row in rows} == set(itertools.product(values[i], values[j]))


# RAYTORCH_FULL_MATRIX=1 runs all 36 combinations
@pytest.mark.parametrize("case, optimizer, workers, reduction", matrix(os.environ.get("RAYTORCH_FULL_MATRIX") == "1"))
def test_replicas_train_what_one_process_trains(ray_local, case, optimizer, workers, reduction):
    c = CASES[case]
    config = TrainConfig(workers=workers, epochs=3, batch_size=c["batch_size"], lr=c["lr"][optimizer],
                         optimizer=optimizer, lr_schedule="cosine", seed=11, reduction=reduction)
    result = Trainer(config, model_fn=c["model_fn"], dataset_fn=c["data"], loss_fn=c["loss_fn"], quiet=True).fit()
    # buffers of its own where the wire has them (the object store holds gradients itself, a
    # collective reduces the replica's own gradient in place)
    assert {m["wire_buffers"] > 0 for m in result.replica_memory} == {reduction == "shared_memory"}
    expected, expected_losses = train_reference(c["model_fn"], c["data"](), c["loss_fn"], seed=11, epochs=3,
                                                batch_size=c["batch_size"], lr=c["lr"][optimizer],
                                                optimizer=optimizer, lr_schedule="cosine")
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(expected_losses, rel=1e-5)
    # every replica holds the same bits
    assert len(result.replica_digests) == workers and len(set(result.replica_digests)) == 1
    assert result.steps == 3 * -(-len(c["data"]()) // c["batch_size"])


def test_collective_wire_reduces_in_buckets_during_backward(ray_local):
    """A gradient of two buckets (collective.BUCKET_ELEMENTS), each started from backward's hooks,
    with micro-batches (only the last one's backward starts buckets) and a step that one of three
    replicas sits out (it issues the same buckets over zeros)."""
    model_fn, data = partial(mlp, 16, 4, 1024), partial(classification_data, 130, 3)
    config = TrainConfig(workers=3, epochs=2, batch_size=32, lr=1e-3, optimizer="adam", lr_schedule="constant",
                         seed=2, accumulate=2, reduction="collective")
    result = Trainer(config, model_fn=model_fn, dataset_fn=data, loss_fn=F.cross_entropy, quiet=True).fit()
    expected, expected_losses = train_reference(model_fn, data(), F.cross_entropy, seed=2, epochs=2, batch_size=64,
                                                lr=1e-3, optimizer="adam")  # a step takes 2 batches of 32
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(expected_losses, rel=1e-5)
    assert len(set(result.replica_digests)) == 1


def test_bf16_gradients_leave_the_float_contract_by_bfloat16_rounding_only(ray_local):
    """grad_dtype bf16 (auto takes the collective wire for it): the gradients are rounded to
    bfloat16 on the wire, so the run is not plain PyTorch's to float32's tolerance, but is to
    bfloat16's; the replicas still hold the same bits."""
    c = CASES["mlp"]
    config = TrainConfig(workers=2, epochs=2, batch_size=c["batch_size"], lr=c["lr"]["sgd"], optimizer="sgd",
                         lr_schedule="constant", seed=11, grad_dtype="bf16")
    result = Trainer(config, model_fn=c["model_fn"], dataset_fn=c["data"], loss_fn=c["loss_fn"], quiet=True).fit()
    expected, expected_losses = train_reference(c["model_fn"], c["data"](), c["loss_fn"], seed=11, epochs=2,
                                                batch_size=c["batch_size"], lr=c["lr"]["sgd"], optimizer="sgd")
    assert len(set(result.replica_digests)) == 1
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_parameters(result.model, expected, rel=1e-6)  # float32's contract: left
    assert_same_parameters(result.model, expected, rel=1e-2)  # bfloat16 keeps ~3 significant digits
    assert result.epoch_losses == pytest.approx(expected_losses, rel=1e-2)


def test_no_shuffle_and_drop_last(ray_local):
    data = partial(linear_data, 100, 5)
    config = TrainConfig(workers=3, epochs=2, batch_size=30, lr=1e-4, optimizer="sgd", lr_schedule="constant",
                         shuffle=False, drop_last=True)
    result = Trainer(config, model_fn=linear, dataset_fn=data, loss_fn=F.mse_loss, quiet=True).fit()
    expected, _ = train_reference(linear, data(), F.mse_loss, seed=0, epochs=2, batch_size=30, lr=1e-4,
                                  optimizer="sgd", shuffle=False, drop_last=True)
    assert_same_parameters(result.model, expected)
    assert result.steps == 2 * 3 and result.samples == 2 * 90


class PlainDataset(torch.utils.data.Dataset):
    """A user's dataset of torch tensors, fetched sample by sample (no raytorch type)."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(2)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_bring_your_own_model_and_dataset_with_eval(ray_local, tmp_path):
    model_fn = partial(torch.nn.Linear, 3, 1)
    config = TrainConfig(workers=2, epochs=4, batch_size=16, lr=0.05, optimizer="adamw", lr_schedule="cosine", seed=5,
                         output_dir=str(tmp_path / "run"))
    result = Trainer(config, model_fn=model_fn, dataset_fn=partial(PlainDataset, 75), loss_fn=F.mse_loss,
                     eval_dataset_fn=partial(PlainDataset, 9)).fit()
    expected, _ = train_reference(model_fn, PlainDataset(75), F.mse_loss, seed=5, epochs=4, batch_size=16, lr=0.05,
                                  optimizer="adamw", lr_schedule="cosine")
    assert_same_parameters(result.model, expected)
    evaluation = PlainDataset(9)
    with torch.no_grad():
        assert result.eval_loss == pytest.approx(F.mse_loss(expected(evaluation.x), evaluation.y).item(), rel=1e-5)
    assert len(result.eval_losses) == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert [r["loss"] for r in records] == result.epoch_losses
    assert records[-1]["eval_loss"] == result.eval_loss
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert TrainConfig(**saved) == config
    # the shared-memory wire unlinks its buffers as soon as the peers have mapped them
    assert {m["wire_buffers"] > 0 for m in result.replica_memory} == {True}
    assert not list(Path("/dev/shm").glob("raytorch-*"))
