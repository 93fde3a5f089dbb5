"""A replica lost at phases of a run beside the steps themselves, on Ray: while the group starts,
during a recovery, while a resume restores its state. Each time it is replaced and the run ends
as plain PyTorch's (the oracle of test_reliability). The faults are deterministic: the first
replica to reach the phase SIGKILLs itself (tests/faults.py)."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from faults import PhaseFault, gated, phase_fault_sgd
from raytorch import TrainConfig, Trainer
from raytorch.driver import trainer
from raytorch.persist.checkpoint import listed
from test_driver_unit import InProcess
from test_reliability import DATA, JOB, KILLED_STEP_TIMEOUT_S, assert_matches_reference, inject, sigkill


# On Ray: a replica lost while the group starts (its settle), while it recovers (a state copied from a
# replica that dies meanwhile: Ray's errors for an argument whose owner died) and while a resume
# restores. A loss in the first step, during an evaluation, at a checkpoint or after the last step
# meets the same call as any step's (test_reliability) and is recovered as test_driver_unit shows
# (in-process replicas, each phase).
@pytest.mark.parametrize("phase", ["start"])
def test_a_replica_lost_while_starting_is_replaced(ray_local, tmp_path, capsys, phase):
    config = TrainConfig(**JOB, workers=2)
    result = Trainer(config, model_fn=partial(PhaseFault, str(tmp_path), phase), dataset_fn=DATA,
                     eval_dataset_fn=DATA, loss_fn=F.mse_loss).fit()
    assert (tmp_path / f"{phase}.claimed").exists()  # the fault did fire
    assert_matches_reference(result)
    [restart] = result.restarts
    assert restart["cause"] == "ActorDiedError" and restart["workers"] == 2 and len(restart["replaced"]) == 1
    out = capsys.readouterr().out
    assert restart["phase"] == "starting" and restart["step"] is None and result.steps_redone == 0
    assert "lost while starting (ActorDiedError): replaced replica-" in out
    assert "while starting, ActorDiedError" in out  # the closing restarts line


def test_a_replica_lost_during_a_recovery_is_replaced_too(ray_local, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "hold").touch()
    config = TrainConfig(**JOB, workers=2, step_timeout=KILLED_STEP_TIMEOUT_S)  # killed: seen at once
    injector = inject(gate, 2, sigkill)  # replica-1 killed at the gate; its replacement dies loading the state
    result = Trainer(config, model_fn=partial(gated, partial(torch.nn.Linear, 1, 1), str(gate), 40), dataset_fn=DATA,
                     loss_fn=F.mse_loss, optimizer_fn=partial(phase_fault_sgd, str(tmp_path), "restore", JOB["lr"]),
                     quiet=True).fit()
    injector.join()
    assert (tmp_path / "restore.claimed").exists()
    assert_matches_reference(result)
    [restart] = result.restarts  # one loss, recovered in two tries
    assert restart["replicas"] == ["replica-1"] and 38 <= restart["step"] < 60


def test_a_replica_lost_while_a_resume_restores_is_replaced(ray_local, tmp_path, capsys):
    run = tmp_path / "run"
    config = TrainConfig(**JOB, workers=2, output_dir=str(run), checkpoint_every=20, keep_checkpoints=100)
    # the run to resume on in-process replicas (tests/fakegroup.py): the driver writes its checkpoints from the
    # same Replica code's state; only the resumed run, whose restore loses a replica, needs real ones
    with pytest.MonkeyPatch.context() as patch:
        runs = InProcess()
        patch.setattr(trainer, "replica_group", runs.replica_group)
        patch.setattr(trainer, "ray_session", runs.ray_session)
        Trainer(config, model_fn=partial(torch.nn.Linear, 1, 1), dataset_fn=DATA, loss_fn=F.mse_loss,
                quiet=True).fit()
    for path in listed(run):  # the run "stopped" after step 40
        if int(path.name[5:14]) > 40:
            path.unlink()
    resumed = Trainer(config, model_fn=partial(torch.nn.Linear, 1, 1), dataset_fn=DATA, loss_fn=F.mse_loss,
                      optimizer_fn=partial(phase_fault_sgd, str(tmp_path), "restore", JOB["lr"]),
                      resume_from=str(run)).fit()
    assert (tmp_path / "restore.claimed").exists() and resumed.resumed_from == 40
    assert_matches_reference(resumed)
    [restart] = resumed.restarts
    assert restart["phase"] == "restoring" and restart["cause"] == "ActorDiedError" and resumed.steps_redone == 0
    assert "lost while restoring (ActorDiedError): replaced" in capsys.readouterr().out
