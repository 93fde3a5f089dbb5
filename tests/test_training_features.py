"""Training features against plain single-process PyTorch (tests/reference.py), on W = 2 and 3
replicas: each keeps the contract (the result does not depend on W). W = 2 on in-process replicas
(tests/fakegroup.py, as test_driver_unit runs them), each feature alone: the whole update, by the
same Replica code, with no process to start (test_contract runs W = 2 on every real wire). W = 3 on
real replicas (Ray), where past two replicas on one node the update is sharded (wire/sharded.py):
the features in three runs that together hold each one (grad_clip keeps the update whole)."""

from functools import partial

import pytest
import torch

from raytorch import ConfigError, TrainConfig, Trainer
from raytorch.tasks.builtin import classification_data, mlp
from reference import assert_same_parameters, train_reference
from test_driver_unit import runs as runs  # noqa: F401  (the fixture: Trainer.fit on in-process replicas, no Ray)

DATA = partial(classification_data, 150, 4)  # 150 samples: batches of 32 leave a short last one
MODEL = partial(mlp, 16, 4, hidden=16)
BASE = dict(epochs=3, batch_size=32, lr=0.05, seed=2)
FEATURES = pytest.mark.parametrize("features", [
    dict(optimizer="sgd", lr_schedule="step"),
    dict(optimizer="adam", lr_schedule="cosine", warmup_steps=4),
    dict(optimizer="sgd", lr_schedule="constant", warmup_steps=3),
    dict(optimizer="adamw", lr_schedule="constant", weight_decay=0.1),
    dict(optimizer="sgd", lr_schedule="constant", weight_decay=0.01, grad_clip=0.05),
    dict(optimizer="adam", lr_schedule="cosine", max_steps=11),  # stops in epoch 2, step 1 of 5
], ids=["step", "cosine+warmup", "warmup", "weight_decay", "grad_clip", "max_steps"])


@pytest.mark.parametrize("features", [
    dict(optimizer="sgd", lr_schedule="step", warmup_steps=3, weight_decay=0.01),  # sharded
    dict(optimizer="adamw", lr_schedule="cosine", warmup_steps=4, weight_decay=0.1, max_steps=11),  # sharded
    dict(optimizer="sgd", lr_schedule="constant", weight_decay=0.01, grad_clip=0.05),  # whole
], ids=["sgd+step+warmup+weight_decay", "adamw+cosine+warmup+weight_decay+max_steps", "grad_clip"])
@pytest.mark.parametrize("workers", [3])  # real replicas; W = 2, each feature alone: the in-process test below
def test_features_match_one_process(ray_local, features, workers):
    assert_feature_matches_one_process(features, workers)


@FEATURES
def test_feature_matches_one_process_on_two_in_process_replicas(runs, features):
    assert_feature_matches_one_process(features, 2)


def assert_feature_matches_one_process(features, workers):
    config = TrainConfig(**BASE, **features, workers=workers)
    result = Trainer(config, model_fn=MODEL, dataset_fn=DATA, loss_fn=torch.nn.functional.cross_entropy,
                     quiet=True).fit()
    expected, losses = train_reference(MODEL, DATA(), torch.nn.functional.cross_entropy, **BASE, **features)
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    assert len(set(result.replica_digests)) == 1
    if "max_steps" in features:
        assert result.steps == 11 and result.samples == 2 * 150 + 32 and len(result.epoch_losses) == 3


def test_clipping_really_clips():
    """The grad_clip case above is only a test if the norm exceeds the bound: it does, by far."""
    torch.manual_seed(BASE["seed"])
    model = MODEL()
    data = DATA()
    x, y = data.batch(torch.arange(32).numpy())
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) > 4 * 0.05


@pytest.mark.parametrize("field, value", [("warmup_steps", -1), ("weight_decay", -0.1), ("grad_clip", 0.0),
                                          ("max_steps", 0)])
def test_bad_values(field, value):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("workers", [3])  # real replicas; W = 2: the in-process test below
def test_accumulating_k_micro_batches_equals_a_k_times_larger_batch(ray_local, workers):
    assert_accumulating_equals_a_larger_batch(workers)


def test_accumulating_k_micro_batches_equals_a_k_times_larger_batch_on_two_in_process_replicas(runs):
    assert_accumulating_equals_a_larger_batch(2)


def assert_accumulating_equals_a_larger_batch(workers):
    job = dict(BASE, optimizer="adam", lr_schedule="cosine")
    config = TrainConfig(**{**job, "batch_size": 16}, accumulate=3, workers=workers)  # steps of 48 samples
    result = Trainer(config, model_fn=MODEL, dataset_fn=DATA, loss_fn=torch.nn.functional.cross_entropy,
                     quiet=True).fit()
    expected, losses = train_reference(MODEL, DATA(), torch.nn.functional.cross_entropy, **{**job, "batch_size": 48})
    assert result.steps == 3 * 4  # 150 samples in steps of 48: 4 per epoch, the last of 6
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)


def early_stop_reference(data, evaluation, *, epochs, batch_size, lr, seed, every, patience):
    """Plain PyTorch with the documented rule: evaluate every `every` steps and at each epoch's end;
    stop once eval loss has not improved for `patience` evaluations. Returns the step it stops at."""
    torch.manual_seed(seed)
    model = MODEL()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = (torch.as_tensor(a) for a in (data.x, data.y))
    ex, ey = (torch.as_tensor(a) for a in (evaluation.x, evaluation.y))
    steps = -(-len(data) // batch_size)
    best, since, done = None, 0, 0
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
        for k in range(steps):
            idx = order[k * batch_size:(k + 1) * batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            done += 1
            if done % every == 0 or k == steps - 1:
                with torch.no_grad():
                    value = torch.nn.functional.cross_entropy(model(ex), ey).item()
                if best is None or value < best:
                    best, since = value, 0
                else:
                    since += 1
                    if since >= patience:
                        return done
    return done


def test_early_stopping_stops_where_one_process_would(ray_local):
    evaluation = classification_data(60, 99)
    job = dict(epochs=40, batch_size=32, lr=0.05, seed=2)
    config = TrainConfig(**job, optimizer="adam", lr_schedule="constant", workers=2, eval_every=2,
                         early_stop_patience=3)
    result = Trainer(config, model_fn=MODEL, dataset_fn=DATA, eval_dataset_fn=lambda: evaluation,
                     loss_fn=torch.nn.functional.cross_entropy, quiet=True).fit()
    stop = early_stop_reference(DATA(), evaluation, **job, every=2, patience=3)
    assert stop < 40 * 5  # it does stop early
    assert result.steps == stop
    expected, _ = train_reference(MODEL, DATA(), torch.nn.functional.cross_entropy, **job, optimizer="adam",
                                  max_steps=stop)
    assert_same_parameters(result.model, expected)


def test_evaluating_needs_an_eval_set():
    with pytest.raises(ConfigError, match="^early_stop_patience: needs an eval set"):
        Trainer(TrainConfig(early_stop_patience=2), model_fn=MODEL, dataset_fn=DATA,
                loss_fn=torch.nn.functional.cross_entropy).fit()
