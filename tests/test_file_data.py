"""NpyDataset: samples read from .npy memory maps train exactly what the same arrays in memory train."""

import pickle
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raytorch import TrainConfig, Trainer
from raytorch.data.datasets import ArrayDataset, NpyDataset, fetch
from reference import assert_same_parameters


def write_arrays(tmp_path, n=75, features=3):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x @ rng.normal(size=(features, 1)) + 0.1).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return x, y, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")


def test_reads_the_rows_asked_for(tmp_path):
    x, y, x_path, y_path = write_arrays(tmp_path)
    ds = NpyDataset(x_path, y_path)
    assert len(ds) == 75
    xb, yb = fetch(ds, [7, 0, 74, 7])
    assert torch.equal(xb, torch.from_numpy(x[[7, 0, 74, 7]]))
    assert torch.equal(yb, torch.from_numpy(y[[7, 0, 74, 7]]))
    xb.add_(1)  # a copy: writable, and the file is untouched
    assert np.array_equal(np.load(x_path), x)
    xi, yi = ds[3]
    assert torch.equal(xi, torch.from_numpy(x[3])) and torch.equal(yi, torch.from_numpy(y[3]))


def test_pickles_as_paths_only(tmp_path):
    x, _, x_path, y_path = write_arrays(tmp_path, n=20_000, features=8)
    ds = NpyDataset(x_path, y_path)
    ds.batch([1, 2])  # maps opened in this process: still not part of the pickle
    blob = pickle.dumps(ds)
    assert len(blob) < 1000, len(blob)
    copy = pickle.loads(blob)
    assert len(copy) == 20_000
    assert torch.equal(copy.batch([19_999])[0], torch.from_numpy(x[[19_999]]))


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    write_arrays(tmp_path)
    monkeypatch.chdir(tmp_path)
    ds = NpyDataset("x.npy", "y.npy")
    assert ds.x_path == str(tmp_path / "x.npy")


def test_bad_files_fail_early_naming_the_file(tmp_path):
    _, _, x_path, y_path = write_arrays(tmp_path)
    with pytest.raises(ValueError, match="missing.npy: no such file"):
        NpyDataset(x_path, str(tmp_path / "missing.npy"))
    np.save(tmp_path / "short.npy", np.zeros((74, 1), np.float32))
    with pytest.raises(ValueError, match=r"x\.npy has 75 samples but .*short\.npy has 74"):
        NpyDataset(x_path, str(tmp_path / "short.npy"))
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(ValueError, match="text.npy: not a memory-mappable .npy array"):
        NpyDataset(str(tmp_path / "text.npy"), y_path)


def test_training_from_files_equals_training_from_memory(ray_local, tmp_path):
    x, y, x_path, y_path = write_arrays(tmp_path)
    config = TrainConfig(workers=2, epochs=3, batch_size=16, lr=0.05, optimizer="sgd", seed=3)
    model_fn = partial(torch.nn.Linear, 3, 1)
    from_files = Trainer(config, model_fn=model_fn, dataset_fn=partial(NpyDataset, x_path, y_path),
                         loss_fn=F.mse_loss, quiet=True).fit()
    in_memory = Trainer(config, model_fn=model_fn, dataset_fn=partial(ArrayDataset, x, y),
                        loss_fn=F.mse_loss, quiet=True).fit()
    assert_same_parameters(from_files.model, in_memory.model)
    assert from_files.epoch_losses == pytest.approx(in_memory.epoch_losses, rel=1e-6)
    assert from_files.steps == in_memory.steps == 3 * 5
