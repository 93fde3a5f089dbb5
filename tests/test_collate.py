"""collate_fn: the user's collate turns a part's items into a batch (sequences of different
lengths, padded), and the run still trains what one process trains on the same batches: each part
is weighted by its number of items, whatever the batch holds."""

import pytest
import torch.nn.functional as F

from ragged import MeanOverSteps, RaggedSequences, pad
from raytorch import ConfigError, TrainConfig, Trainer
from raytorch.replica.batches import check_dataset
from reference import assert_same_parameters, train_reference

JOB = dict(epochs=2, batch_size=16, lr=0.02, optimizer="adam", seed=3)


@pytest.mark.parametrize("named", [False, True], ids=["collate_fn", "config.collate"])
def test_ragged_sequences_through_collate_train_what_one_process_trains(ray_local, named):
    # the API's collate_fn, or the CLI's and YAML's --collate pkg.module:fn (the same field)
    config = TrainConfig(workers=2, collate="ragged:pad" if named else None, **JOB)
    result = Trainer(config, model_fn=MeanOverSteps, dataset_fn=RaggedSequences, loss_fn=F.cross_entropy,
                     collate_fn=None if named else pad, quiet=True).fit()
    expected, losses = train_reference(MeanOverSteps, RaggedSequences(), F.cross_entropy, collate_fn=pad, **JOB)
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)


def test_items_that_do_not_collate_fail_before_any_replica_starts():
    with pytest.raises(ConfigError, match=r"do not collate into a batch .*--collate pkg.module:fn"):
        check_dataset(RaggedSequences(seed=1), "dataset", None)
    check_dataset(RaggedSequences(seed=1), "dataset", None, pad)  # padded, they do

    def broken(items):
        raise ValueError("no padding today")

    with pytest.raises(ConfigError, match=r"collate_fn: failed on the dataset's first 2 items: ValueError: no padding"):
        check_dataset(RaggedSequences(seed=1), "dataset", None, broken)
