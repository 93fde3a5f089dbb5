"""Training code as people bring it: their own step on dict batches, their own optimizer (parameter
groups) and scheduler; each against plain single-process PyTorch. And the early, one-line errors
for what does not fit."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raytorch import ConfigError, ReplicaError, TrainConfig, Trainer
from raytorch.replica.actor import Replica
from raytorch.tasks.builtin import classification_data, mlp
from reference import assert_same_parameters, train_reference
from test_driver_unit import runs as runs  # noqa: F401  (the fixture: Trainer.fit on in-process replicas, no Ray)

PAIRS = partial(classification_data, 150, 4)


class DictDataset(torch.utils.data.Dataset):
    """The pairs of PAIRS as a Hugging Face pipeline gives items: dicts, with a non-tensor field."""

    def __init__(self):
        self.pairs = PAIRS()

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        x, y = self.pairs[i]
        return {"features": x, "labels": y, "id": f"sample-{i}"}


class Classifier(torch.nn.Module):
    """A model that computes its own loss from keyword inputs, as transformers' models do."""

    def __init__(self):
        super().__init__()
        self.net = mlp(16, 4, 32)

    def forward(self, features, labels):
        return {"loss": F.cross_entropy(self.net(features), labels)}


def dict_step(model, batch):
    assert isinstance(batch["id"], list)  # strings ride along, collated, not moved
    return model(features=batch["features"], labels=batch["labels"])["loss"]


# W = 3 only: its parts are uneven (11, 11, 10), the harder case of the step's loss weighting; dict batches
# through step_fn on W = 2 run in the loader-workers and Ray Data tests below, and test_contract runs W = 2
@pytest.mark.parametrize("workers", [3])
def test_dict_batches_through_step_fn_train_what_one_process_trains(ray_local, workers):
    config = TrainConfig(workers=workers, epochs=2, batch_size=32, lr=0.01, optimizer="adam", seed=3)
    result = Trainer(config, model_fn=Classifier, dataset_fn=DictDataset, eval_dataset_fn=DictDataset,
                     step_fn=dict_step, quiet=True).fit()
    expected, losses = train_reference(lambda: Classifier().net, PAIRS(), F.cross_entropy, seed=3, epochs=2,
                                       batch_size=32, lr=0.01, optimizer="adam")
    assert_same_parameters(result.model.net, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    pairs = PAIRS()
    x, y = torch.as_tensor(pairs.x), torch.as_tensor(pairs.y)
    with torch.no_grad():  # evaluation runs the step too (no accuracy: the step gives a loss only)
        assert result.eval_loss == pytest.approx(F.cross_entropy(expected(x), y).item(), rel=1e-5)


def grouped_sgd(model):
    """No weight decay on biases: two parameter groups, momentum."""
    decay = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    rest = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return torch.optim.SGD([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                           lr=0.05, momentum=0.9)


def halving(optimizer, total_steps):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, total_steps // 3), gamma=0.5)


def test_user_optimizer_with_parameter_groups_and_user_schedule(ray_local):
    model_fn = partial(mlp, 16, 4, 32)
    config = TrainConfig(workers=2, epochs=2, batch_size=32, seed=5)
    result = Trainer(config, model_fn=model_fn, dataset_fn=PAIRS, loss_fn=F.cross_entropy, optimizer_fn=grouped_sgd,
                     schedule_fn=halving, quiet=True).fit()
    expected, losses = train_reference(model_fn, PAIRS(), F.cross_entropy, seed=5, epochs=2, batch_size=32, lr=None,
                                       optimizer=None, optimizer_fn=grouped_sgd, schedule_fn=halving)
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)


def test_items_that_are_not_pairs_or_a_dataset_without_length_fail_before_any_replica():
    # no ray_local: both are refused in the driver, before Ray starts
    config = TrainConfig(workers=2, epochs=1, batch_size=8)
    with pytest.raises(ConfigError, match=r"dataset: items are a dict of features, labels, id, not \(input, target\) "
                                          r"pairs: give step_fn\(model, batch\) -> loss instead of loss_fn"):
        Trainer(config, model_fn=Classifier, dataset_fn=DictDataset, loss_fn=F.cross_entropy, quiet=True).fit()

    with pytest.raises(ConfigError, match=r"dataset: iterator has no length and is no IterableDataset: give a "
                                          r"map-style Dataset .* or a torch.utils.data.IterableDataset"):
        Trainer(config, model_fn=Classifier, dataset_fn=lambda: iter(PAIRS()), loss_fn=F.cross_entropy,
                quiet=True).fit()
    with pytest.raises(ConfigError, match="give loss_fn.*or step_fn.*one of the two"):
        Trainer(config, model_fn=Classifier, dataset_fn=DictDataset, quiet=True)


def _replica(step_fn=None, loss_fn=None, data=None):
    config = TrainConfig(workers=1, batch_size=4, lr=0.1, optimizer="sgd")
    torch.manual_seed(0)
    data = data or PAIRS()
    return Replica(0, config, model_fn=partial(mlp, 16, 4, 8), loss_fn=loss_fn, init_state=mlp(16, 4, 8).state_dict(),
                   train_set=data, eval_set=data, total_steps=1, step_fn=step_fn)


def test_a_loss_that_is_not_a_scalar_or_labels_of_the_wrong_dtype_name_the_replica_and_the_fix():
    unreduced = _replica(step_fn=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], reduction="none"))
    with pytest.raises(ReplicaError, match=r"replica 0 failed in run after 0 steps: TypeError: the loss must be a "
                                           r"scalar .*shape \(4,\): reduce it \(\.mean\(\)\)"):
        unreduced.run([(np.arange(4), None, 1.0)])
    pairs = PAIRS()
    float_labels = type(pairs)(pairs.x, pairs.y.astype(np.float32))
    wrong = _replica(loss_fn=F.cross_entropy, data=float_labels)
    with pytest.raises(ReplicaError, match=r"replica 0 .*loss_fn\(output, target\) failed on output a "
                                           r"torch.float32 tensor of shape \(4, 4\) and target a torch.float32 "
                                           r"tensor of shape \(4,\) \(class labels must be integers: store them as "
                                           r"int64\)"):
        wrong.run([(np.arange(4), None, 1.0)])


class HalfBf16(torch.nn.Module):
    """A float32 layer, a bfloat16 layer, a frozen layer and an unused parameter."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 32)
        self.second = torch.nn.Linear(32, 4).to(torch.bfloat16)
        self.frozen = torch.nn.Linear(16, 16).requires_grad_(False)
        self.unused = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        hidden = torch.relu(self.first(self.frozen(x)))
        return self.second(hidden.to(torch.bfloat16)).float()


@pytest.mark.parametrize("workers", [1, 2])
def test_parameters_of_two_dtypes_frozen_and_unused_ones_train(ray_local, workers):
    config = TrainConfig(workers=workers, epochs=2, batch_size=32, lr=0.05, optimizer="sgd", seed=7)
    result = Trainer(config, model_fn=HalfBf16, dataset_fn=PAIRS, loss_fn=F.cross_entropy, quiet=True).fit()
    expected, losses = train_reference(HalfBf16, PAIRS(), F.cross_entropy, seed=7, epochs=2, batch_size=32,
                                       lr=0.05, optimizer="sgd")
    assert result.model.second.weight.dtype == torch.bfloat16
    # one replica: the same bits as plain PyTorch (bf16 gradients pass through float32 exactly);
    # two: the halves' bf16 gradients are summed in float32, then rounded to bf16 once
    assert_same_parameters(result.model, expected, rel=1e-6 if workers == 1 else 2e-2)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5 if workers == 1 else 1e-2)
    assert torch.equal(result.model.frozen.weight, expected.frozen.weight)


class NormedNet(torch.nn.Module):
    """BatchNorm on the inputs (its running mean depends on the data alone), and after a layer."""

    def __init__(self):
        super().__init__()
        self.inputs = torch.nn.BatchNorm1d(16)
        self.hidden = torch.nn.Linear(16, 32)
        self.norm = torch.nn.BatchNorm1d(32)
        self.out = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.hidden(self.inputs(x)))))


# W = 3 only: uneven parts (11, 11, 10), whose running statistics are averaged with unequal weights, the case
# W = 2 (even halves) is a special case of; test_contract runs W = 2 on every wire
@pytest.mark.parametrize("workers", [3])
def test_batchnorm_statistics_never_diverge_and_the_running_mean_is_one_process(ray_local, workers, capsys):
    # even parts: BatchNorm refuses a training part of one sample, which an adaptive cut may give
    config = TrainConfig(workers=workers, epochs=2, batch_size=32, lr=0.05, optimizer="sgd", seed=9, split="even")
    result = Trainer(config, model_fn=NormedNet, dataset_fn=PAIRS, loss_fn=F.cross_entropy).fit()
    assert "the model has BatchNorm" in capsys.readouterr().out  # said once, at start
    assert len(set(result.replica_digests)) == 1  # parameters and running statistics alike
    expected, _ = train_reference(NormedNet, PAIRS(), F.cross_entropy, seed=9, epochs=2, batch_size=32, lr=0.05,
                                  optimizer="sgd")
    # the inputs' running mean is linear in the batch means: the same as one process's
    torch.testing.assert_close(result.model.inputs.running_mean, expected.inputs.running_mean, rtol=1e-5, atol=1e-6)
    assert int(result.model.inputs.num_batches_tracked) == int(expected.inputs.num_batches_tracked)


class SlowDict(DictDataset):
    """A __getitem__ that waits (as reading a file does) and says which thread fetched it."""

    def __getitem__(self, i):
        import threading
        import time

        time.sleep(0.0005)
        return {**super().__getitem__(i), "thread": threading.current_thread().name}


def loader_step(model, batch):
    assert all(name.startswith("raytorch-loader") for name in batch["thread"]), batch["thread"]
    return dict_step(model, batch)


def test_loader_workers_fetch_in_the_background_and_train_the_same(ray_local):
    config = TrainConfig(workers=2, epochs=2, batch_size=32, lr=0.01, optimizer="adam", seed=3, loader_workers=3)
    result = Trainer(config, model_fn=Classifier, dataset_fn=SlowDict, step_fn=loader_step, quiet=True).fit()
    expected, losses = train_reference(lambda: Classifier().net, PAIRS(), F.cross_entropy, seed=3, epochs=2,
                                       batch_size=32, lr=0.01, optimizer="adam")
    assert_same_parameters(result.model.net, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)


def test_the_seed_notes_run_is_retraced(runs, capsys):
    """The note's table (epochs 0-1): w = b = 0, its list walked in order, one sample a step, SGD 1e-4.
    Its data came from an unseeded random.randrange: the figures agree to what the data changes.
    On an in-process replica (the same Replica code; its 2,000 one-sample steps need no Ray)."""
    from raytorch.cli import parse_config
    from raytorch.tasks.resolve import training

    config = parse_config(["--batch-size", "1", "--workers", "1", "--lr", "1e-4", "--optimizer", "sgd",
                           "--init", "zeros", "--no-shuffle", "--epochs", "2"])
    assert config.schedule == "constant"  # the linear recipe's cosine goes with its Adam, not with sgd
    what = training(config)
    Trainer(config, model_fn=what.model_fn, dataset_fn=what.dataset_fn, loss_fn=what.loss_fn).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch ")]
    traced = [tuple(float(v) for v in line.split("(w=")[1].split(",")[0:1] + line.split("b=")[1][:5].split())
              for line in lines]
    note = [(2.011, 0.402), (2.007, 0.637)]
    assert len(traced) == 2
    for (w, b), (note_w, note_b) in zip(traced, note):
        assert abs(w - note_w) < 0.03 and abs(b - note_b) < 0.03, (traced, note)


def test_compiled_models_train_what_one_process_trains(ray_local):
    model_fn, data = partial(mlp, 16, 4, 32), partial(classification_data, 128, 4)  # parts of 16: one shape
    config = TrainConfig(workers=2, epochs=1, batch_size=32, lr=0.05, optimizer="sgd", seed=1, split="even",
                         compile=True)
    result = Trainer(config, model_fn=model_fn, dataset_fn=data, loss_fn=F.cross_entropy, quiet=True).fit()
    expected, losses = train_reference(model_fn, data(), F.cross_entropy, seed=1, epochs=1, batch_size=32, lr=0.05,
                                       optimizer="sgd")
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    replica = Replica(0, config, model_fn=model_fn, loss_fn=F.cross_entropy, init_state=model_fn().state_dict(),
                      train_set=data(), eval_set=None, total_steps=1)
    assert isinstance(replica.learner.forward, torch._dynamo.eval_frame.OptimizedModule)  # what the steps ran


class Augmented(torch.utils.data.Dataset):
    """PAIRS with a random augmentation per fetch (noise and a random feature flip), drawn from
    raytorch.sample_generator(); slow enough that loader threads overlap."""

    def __init__(self):
        self.pairs = PAIRS()

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        import time

        import raytorch

        time.sleep(0.0002)
        x, y = self.pairs[i]
        generator = raytorch.sample_generator()
        noise = 0.3 * torch.randn(x.shape, generator=generator)
        flip = torch.rand((), generator=generator) < 0.5
        return (torch.flip(x, [0]) if flip else x) + noise, y


# W = 3 only: three replicas fetching their parts, each with loader threads, draw what one process draws, which
# W = 1 (one replica fetching every sample, by the same code) is a special case of; test_contract runs W = 1
@pytest.mark.parametrize("workers", [3])
def test_seeded_augmentation_with_loader_workers_trains_what_one_process_trains(ray_local, workers):
    import raytorch

    config = TrainConfig(workers=workers, epochs=2, batch_size=32, lr=0.05, optimizer="sgd", seed=4,
                         loader_workers=3)
    result = Trainer(config, model_fn=partial(mlp, 16, 4, 32), dataset_fn=Augmented, loss_fn=F.cross_entropy,
                     quiet=True).fit()
    # the oracle: plain PyTorch, fetching sample i of epoch e within raytorch.seeded(seed, e, i)
    torch.manual_seed(4)
    model, data = mlp(16, 4, 32), Augmented()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(2):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(4 + epoch))
        for batch in order.split(32):
            samples = []
            for i in batch.tolist():
                with raytorch.seeded(4, epoch, i):
                    samples.append(data[i])
            x, y = torch.utils.data.default_collate(samples)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert_same_parameters(result.model, model)
    # and the augmentation did draw: a fetch outside raytorch's differs from a seeded one
    with raytorch.seeded(4, 0, 0):
        first = Augmented()[0][0]
    with raytorch.seeded(4, 1, 0):
        assert not torch.equal(first, Augmented()[0][0])  # another epoch, another draw


class NormedCNN(torch.nn.Module):
    """A small ResNet-style stem: convolutions with BatchNorm2d, a head with BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
            torch.nn.Conv2d(6, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8, momentum=None), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 16), torch.nn.BatchNorm1d(16),
                                        torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.features(x))


def images():
    from raytorch.data.datasets import ArrayDataset

    rng = np.random.default_rng(5)
    x = rng.normal(size=(100, 1, 8, 8)).astype(np.float32) + 0.5  # a mean away from 0: the statistics matter
    y = (x[:, 0, :4].sum(axis=(1, 2)) > 8).astype(np.int64) + 2 * (x[:, 0, :, :4].sum(axis=(1, 2)) > 8)
    return ArrayDataset(x, y)


# W = 3 only: uneven parts (9, 8, 8) of the batch statistics; W = 2 trains a synchronized BatchNorm against the
# same oracle in the lost-replica test below
@pytest.mark.parametrize("workers", [3])
def test_sync_batchnorm_cnn_trains_what_one_process_trains(ray_local, workers, capsys):
    config = TrainConfig(workers=workers, epochs=2, batch_size=25, lr=0.1, optimizer="sgd", seed=2,
                         sync_batchnorm=True)
    result = Trainer(config, model_fn=NormedCNN, dataset_fn=images, loss_fn=F.cross_entropy).fit()
    out = capsys.readouterr().out
    assert "BatchNorm, synchronized" in out and "sync_batchnorm: batch statistics" in out  # the wire: gloo
    expected, losses = train_reference(NormedCNN, images(), F.cross_entropy, seed=2, epochs=2, batch_size=25,
                                       lr=0.1, optimizer="sgd")
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    for name, buffer in expected.state_dict().items():  # running means, variances, batches tracked
        torch.testing.assert_close(result.model.state_dict()[name], buffer, rtol=1e-5, atol=1e-6, msg=name)
    assert len(set(result.replica_digests)) == 1


def test_sync_batchnorm_refuses_what_it_cannot_keep_equal():
    with pytest.raises(ConfigError, match="sync_batchnorm.*accumulate to 1"):
        TrainConfig(sync_batchnorm=True, accumulate=2)
    with pytest.raises(ConfigError, match="sync_batchnorm.*'auto' or 'collective'"):
        TrainConfig(sync_batchnorm=True, reduction="shared_memory")
    from raytorch.core.runplan import RunPlan

    with pytest.raises(ConfigError, match="last batch has 1 samples for 3 replicas: set drop_last"):
        RunPlan.of(TrainConfig(workers=3, batch_size=25, sync_batchnorm=True), 101)
    RunPlan.of(TrainConfig(workers=3, batch_size=25, sync_batchnorm=True, drop_last=True), 101)


def test_a_replica_lost_in_a_sync_batchnorm_forward_is_replaced_and_the_run_is_unchanged(ray_local, tmp_path):
    from faults import gated
    from test_reliability import KILLED_STEP_TIMEOUT_S, inject, sigkill

    folder = tmp_path / "gate"
    folder.mkdir()
    (folder / "hold").touch()
    # the peer waits in BatchNorm's all-reduce, inside its forward (computing): step_timeout outlasts the
    # injector however slow the machine; the killed replica is seen at once
    config = TrainConfig(workers=2, epochs=2, batch_size=25, lr=0.1, optimizer="sgd", seed=2, sync_batchnorm=True,
                         step_timeout=KILLED_STEP_TIMEOUT_S)
    injector = inject(folder, 2, sigkill)  # at the 5th forward: in epoch 1, the peer then waits in BatchNorm
    result = Trainer(config, model_fn=partial(gated, NormedCNN, str(folder), 5), dataset_fn=images,
                     loss_fn=F.cross_entropy, quiet=True).fit()
    injector.join()
    [restart] = result.restarts
    assert restart["replicas"] == ["replica-1"] and restart["cause"] == "ActorDiedError"
    expected, losses = train_reference(NormedCNN, images(), F.cross_entropy, seed=2, epochs=2, batch_size=25,
                                       lr=0.1, optimizer="sgd")
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)


class PairStream(torch.utils.data.IterableDataset):
    """PAIRS read as a stream: a new order each epoch (set_epoch, as Hugging Face's streams shuffle
    a buffer per epoch), noise drawn as each item is read, and no __len__ (counted by a pass)."""

    def __init__(self, noise=0.2):
        self.pairs, self.epoch, self.noise = PAIRS(), 0, noise

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        import raytorch

        for i in torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(100 + self.epoch)).tolist():
            x, y = self.pairs[i]
            yield x + self.noise * torch.randn(x.shape, generator=raytorch.sample_generator()), y


@pytest.mark.parametrize("workers, loader_workers", [(2, 0), (3, 2)])
def test_a_stream_trains_what_one_process_reading_it_in_order_trains(ray_local, workers, loader_workers, capsys):
    import raytorch

    config = TrainConfig(workers=workers, epochs=2, batch_size=32, lr=0.05, optimizer="sgd", seed=6,
                         loader_workers=loader_workers)
    result = Trainer(config, model_fn=partial(mlp, 16, 4, 32), dataset_fn=PairStream,
                     eval_dataset_fn=partial(PairStream, noise=0.0),
                     loss_fn=F.cross_entropy).fit()
    assert "a stream (IterableDataset) of 150 items an epoch, counted by one pass" in capsys.readouterr().out
    # the oracle: plain PyTorch reading the stream in order, item i of epoch e within raytorch.seeded(6, e, i)
    torch.manual_seed(6)
    model, stream = mlp(16, 4, 32), PairStream()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(2):
        stream.set_epoch(epoch)
        items, iterator = [], iter(stream)
        for i in range(150):
            with raytorch.seeded(6, epoch, i):
                items.append(next(iterator))
        for start in range(0, 150, 32):
            x, y = torch.utils.data.default_collate(items[start:start + 32])
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert_same_parameters(result.model, model)
    x, y = torch.as_tensor(PAIRS().x), torch.as_tensor(PAIRS().y)  # evaluation: a stream too, each replica its part
    with torch.no_grad():
        assert result.eval_loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)


class Counting(torch.utils.data.IterableDataset):
    def __init__(self, items):
        self.items, self.passes = items, 0

    def __iter__(self):
        self.passes += 1
        yield from range(self.items)


def test_a_stream_is_read_by_position_and_starts_over_for_an_earlier_one():
    import pickle

    from raytorch.data.datasets import Stream

    stream = Stream(Counting(10), 10)
    assert stream.take([1, 2], (0, 0)) == [1, 2] and stream.take([5], (0, 0)) == [5]
    assert stream.stream.passes == 1  # forward: one pass
    assert stream.take([3], (0, 0)) == [3] and stream.stream.passes == 2  # back: from the start
    assert stream.take([0], (0, 1)) == [0] and stream.stream.passes == 3  # another epoch
    copy = pickle.loads(pickle.dumps(stream))  # as a replica gets it: no iterator, its own position
    assert copy.iterator is None and copy.take([9], None) == [9]
    short = Stream(Counting(4), 10)  # a stream that yields fewer items than its first pass
    with pytest.raises(ValueError, match="the stream ended after 4 items in epoch 0, but has 10"):
        short.take([6], (0, 0))


def ray_pairs():
    import ray.data

    pairs = PAIRS()
    return ray.data.from_items([{"x": pairs.x[i], "y": int(pairs.y[i]), "id": f"row-{i}"} for i in range(len(pairs))],
                               override_num_blocks=4)


def ray_step(model, batch):
    assert isinstance(batch["id"], list)
    return model(features=batch["x"], labels=batch["y"])["loss"]


def test_a_ray_data_dataset_trains_what_one_process_trains(ray_local):
    config = TrainConfig(workers=2, epochs=2, batch_size=32, lr=0.01, optimizer="adam", seed=3)
    result = Trainer(config, model_fn=Classifier, dataset_fn=ray_pairs, step_fn=ray_step, quiet=True).fit()
    expected, losses = train_reference(lambda: Classifier().net, PAIRS(), F.cross_entropy, seed=3, epochs=2,
                                       batch_size=32, lr=0.01, optimizer="adam")
    assert_same_parameters(result.model.net, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
