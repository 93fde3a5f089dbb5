"""The contract with the randomness of the models people bring: a model with dropout (an MLP, a
transformer whose attention weights drop too) at W = 1, 2, 3, with the adaptive split and with
accumulate = 2, and through a replica's loss, trains what one plain PyTorch process trains with
raytorch.seeded_forward around its forward; a model that draws a buffer in __init__ trains on the
driver's buffer in every replica."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from dropout_models import RandomFeatures, SequenceClassifier, dropout_mlp, sequence_data
from faults import gated
from raytorch import TrainConfig, Trainer
from raytorch.tasks.builtin import classification_data
from reference import assert_same_parameters, train_reference
from test_reliability import KILLED_STEP_TIMEOUT_S, inject, sigkill

# SGD for the transformer: its attention's key bias has no true gradient (softmax ignores a shift),
# and Adam would turn that bias's float noise into full-size steps
CASES = {
    "mlp": dict(model_fn=dropout_mlp, data=partial(classification_data, 302, 3), batch_size=64,
                optimizer="adam", lr=0.01),
    "transformer": dict(model_fn=SequenceClassifier, data=partial(sequence_data, 150, 3), batch_size=32,
                        optimizer="sgd", lr=0.1),
}
JOB = dict(epochs=2, seed=5)


def optimizer(case: str) -> dict:
    return {"optimizer": CASES[case]["optimizer"], "lr": CASES[case]["lr"]}


def assert_trains_what_one_process_trains(result, case: str, accumulate: int = 1, seeded_forward: bool = True):
    c = CASES[case]
    expected, losses = train_reference(c["model_fn"], c["data"](), F.cross_entropy, **JOB, **optimizer(case),
                                       batch_size=c["batch_size"] * accumulate, seeded_forward=seeded_forward)
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    assert len(set(result.replica_digests)) == 1


@pytest.mark.parametrize("case, workers, accumulate", [
    ("mlp", 1, 1), ("mlp", 2, 2), ("mlp", 3, 1), ("transformer", 2, 1), ("transformer", 3, 2)])
def test_dropout_trains_what_one_process_trains_at_any_w(ray_local, case, workers, accumulate):
    c = CASES[case]
    config = TrainConfig(workers=workers, batch_size=c["batch_size"], accumulate=accumulate, split="adaptive", **JOB,
                         **optimizer(case))
    result = Trainer(config, model_fn=c["model_fn"], dataset_fn=c["data"], loss_fn=F.cross_entropy,
                     quiet=True).fit()
    assert_trains_what_one_process_trains(result, case, accumulate)


def test_the_oracle_tells_dropouts_masks_apart():
    # without seeded_forward around its forward, the plain loop draws other masks: the test above
    # compares runs that a wrong placement would set apart
    c = CASES["mlp"]
    seeded, _ = train_reference(c["model_fn"], c["data"](), F.cross_entropy, **JOB, **optimizer("mlp"), batch_size=64,
                                seeded_forward=True)
    plain, _ = train_reference(c["model_fn"], c["data"](), F.cross_entropy, **JOB, **optimizer("mlp"), batch_size=64)
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_parameters(plain, seeded)


def test_dropout_through_a_lost_replica_trains_what_one_process_trains(ray_local, tmp_path):
    folder = tmp_path / "gate"
    folder.mkdir()
    (folder / "hold").touch()
    c = CASES["mlp"]
    config = TrainConfig(workers=2, batch_size=64, step_timeout=KILLED_STEP_TIMEOUT_S, **JOB, **optimizer("mlp"))
    trainer = Trainer(config, model_fn=partial(gated, dropout_mlp, str(folder), 6, "replica-1"),
                      dataset_fn=c["data"], loss_fn=F.cross_entropy, quiet=True)
    injector = inject(folder, 2, sigkill)  # at the 6th of 10 steps
    result = trainer.fit()
    injector.join()
    [restart] = result.restarts
    assert restart["replicas"] == ["replica-1"] and restart["replaced"] == ["replica-1"]
    assert_trains_what_one_process_trains(result, "mlp")


def test_a_buffer_drawn_in_init_is_the_drivers_in_every_replica(ray_local):
    config = TrainConfig(workers=2, batch_size=64, **JOB, **optimizer("mlp"))
    result = Trainer(config, model_fn=RandomFeatures, dataset_fn=CASES["mlp"]["data"], loss_fn=F.cross_entropy,
                     quiet=True).fit()
    expected, losses = train_reference(RandomFeatures, CASES["mlp"]["data"](), F.cross_entropy, **JOB,
                                       **optimizer("mlp"), batch_size=64)
    assert_same_parameters(result.model, expected)
    assert torch.equal(result.model.features, expected.features)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
