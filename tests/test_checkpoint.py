"""Checkpoint files on their own (no Ray): atomic, checksummed, the newest K kept, foreign files refused."""

import pytest
import torch

from raytorch import CheckpointError
from raytorch.persist.checkpoint import listed, load, load_latest, save


def payload(value):
    return {"model": {"weight": torch.full((2, 2), float(value))}, "epoch": value}


def test_save_keeps_the_newest_k_and_load_latest_reads_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        save(tmp_path, step, payload(step), keep=2)
    assert [p.name for p in listed(tmp_path)] == ["step-000000020.pt", "step-000000015.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000000015.pt", "step-000000015.pt.sha256", "step-000000020.pt", "step-000000020.pt.sha256"]
    saved, path, skipped = load_latest(tmp_path)
    assert (saved["step"], saved["epoch"], path.name, skipped) == (20, 20, "step-000000020.pt", [])
    assert torch.equal(saved["model"]["weight"], torch.full((2, 2), 20.0))
    # a plain torch.load reads it too (weights only)
    assert torch.load(path, weights_only=True)["step"] == 20


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[:50]), "checksum mismatch"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"x"), "checksum mismatch"),
    (lambda p: p.with_name(p.name + ".sha256").unlink(), "no checksum file beside it"),
])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, damage, reason):
    save(tmp_path, 1, payload(1), keep=3)
    newest = save(tmp_path, 2, payload(2), keep=3)
    damage(newest)
    saved, path, skipped = load_latest(tmp_path)
    assert saved["step"] == 1 and path.name == "step-000000001.pt"
    assert len(skipped) == 1 and "step-000000002.pt" in skipped[0] and reason in skipped[0]


def test_no_temporary_files_are_left(tmp_path):
    save(tmp_path, 3, payload(3), keep=1)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_file_that_is_not_ours_gets_a_clear_error(tmp_path):
    import hashlib

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, data in (("step-000000001.pt", b"not a checkpoint at all"), ("step-000000002.pt", None)):
        path = folder / name
        if data is None:
            torch.save({"weight": torch.ones(1)}, path)  # a valid torch file, but someone else's
            data = path.read_bytes()
        path.write_bytes(data)
        path.with_name(name + ".sha256").write_text(hashlib.sha256(data).hexdigest())
    with pytest.raises(CheckpointError, match=r"step-000000002.pt: not a raytorch checkpoint \(no .* format marker\)"):
        load(folder / "step-000000002.pt")
    with pytest.raises(CheckpointError, match=r"step-000000001.pt: not a raytorch checkpoint \("):
        load(folder / "step-000000001.pt")
    with pytest.raises(CheckpointError, match=r"nothing to resume from"):
        load_latest(tmp_path)


def test_pickled_code_is_refused(tmp_path):
    """weights_only: a checkpoint cannot run code when loaded."""
    import hashlib
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    path = folder / "step-000000001.pt"
    torch.save({"format": "raytorch-checkpoint/1", "x": Evil()}, path, pickle_module=pickle)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="not a raytorch checkpoint"):
        load(path)
