"""The driver (Trainer.fit, its EpochLoop, StepPipeline and Recovery) on an in-process FakeGroup
(fakegroup.py): the loop, the pipeline and every recovery branch, without Ray, each run checked
against plain single-process PyTorch (reference.py)."""

import json
import re
import shutil
from contextlib import contextmanager
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from fakegroup import FakeGroup
from raytorch import Callback, TrainConfig, Trainer
from raytorch.core.balance import SpeedEstimate
from raytorch.driver import pipeline, trainer
from raytorch.driver.policy import RecoveryPolicy
from raytorch.driver.recovery import until_settled
from raytorch.errors import ReplicaError
from raytorch.group.cluster import Session
from raytorch.tasks.builtin import classification_data, linear, linear_data, mlp
from reference import assert_same_parameters, train_reference

pytestmark = pytest.mark.unit

# 66 samples in batches of 16: 5 steps an epoch, the last of 2 samples (at W = 3 one replica sits it out)
CASES = {
    "linear": dict(model_fn=partial(linear, 1, 1), data=partial(linear_data, 66, 3), loss_fn=F.mse_loss,
                   lr={"sgd": 1e-4, "adam": 0.05}),
    "mlp": dict(model_fn=partial(mlp, 16, 4, 8), data=partial(classification_data, 66, 3), loss_fn=F.cross_entropy,
                lr={"sgd": 0.1, "adam": 0.01}),
}
MLP = CASES["mlp"]
EVAL = partial(classification_data, 40, 7)
JOB = dict(epochs=3, batch_size=16, lr=0.01, optimizer="adam", lr_schedule="constant", seed=11)  # 15 steps


class InProcess:
    """Trainer.fit on FakeGroups, in this process: `setup(group)` runs on each group as it is made
    (faults go in there); `groups` lists them."""

    def __init__(self):
        self.groups: list[FakeGroup] = []
        self.setup = lambda group: None

    @contextmanager
    def replica_group(self, config, run_name, **replica_args):
        group = FakeGroup(config, run_name, **replica_args)
        self.setup(group)
        self.groups.append(group)
        try:
            yield group
        finally:
            group.close()

    @staticmethod
    @contextmanager
    def ray_session(address=None, metadata=None, quiet=False):
        yield Session("in-process", None, started_here=False, resources={"CPU": 2.0}, is_driver=False)

    def fit(self, case=MLP, callbacks=(), **settings):
        """Train `case` with TrainConfig(**JOB, **settings); the result."""
        config = TrainConfig(**{**JOB, **settings})
        return Trainer(config, model_fn=case["model_fn"], dataset_fn=case["data"], loss_fn=case["loss_fn"],
                       quiet=True, callbacks=callbacks, **({"eval_dataset_fn": EVAL} if case is MLP else {})).fit()


@pytest.fixture
def runs(monkeypatch):
    runs = InProcess()
    monkeypatch.setattr(trainer, "replica_group", runs.replica_group)
    monkeypatch.setattr(trainer, "ray_session", runs.ray_session)
    return runs


class Records(Callback):
    """Every record the run tells, in order."""

    def __init__(self):
        self.records = []

    def on_record(self, record):
        self.records.append(record)

    def on_step(self, record):  # steps come through on_steps, not on_record
        self.records.append(record)

    def of(self, event):
        return [r for r in self.records if r["event"] == event]


def reference(case=MLP, **settings):
    """Plain PyTorch's model and epoch losses for the job (settings override JOB)."""
    job = {**JOB, **settings}
    return train_reference(case["model_fn"], case["data"](), case["loss_fn"], **job)


def eval_loss(model):
    data = EVAL()
    with torch.no_grad():
        return F.cross_entropy(model(torch.as_tensor(data.x)), torch.as_tensor(data.y)).item()


def assert_trained_as_one_process(result, case=MLP, **settings):
    expected, losses = reference(case, **settings)
    assert_same_parameters(result.model, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    assert len(set(result.replica_digests)) == 1  # every replica holds the same bits


# -- the loop and the pipeline -------------------------------------------------------------------------------


class CyclingShares(SpeedEstimate):
    """An adaptive split that moves every step: shares 1, 2, 3 rotated by one replica each call."""

    def __init__(self, replicas, **kwargs):
        super().__init__(replicas, **kwargs)
        self.calls = 0

    def shares(self, samples, current=None, **_):
        self.calls += 1
        replicas = len(self.seen)
        return [(r + self.calls) % replicas + 1 for r in range(replicas)]


@pytest.mark.parametrize("split", ["even", "adaptive"])
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("case", ["linear", "mlp"])
def test_replicas_train_what_one_process_trains(runs, monkeypatch, case, optimizer, workers, split):
    monkeypatch.setattr(pipeline, "SpeedEstimate", CyclingShares)
    records = Records()
    c = CASES[case]
    result = runs.fit(c, [records], workers=workers, lr=c["lr"][optimizer], optimizer=optimizer, split=split,
                      lr_schedule="cosine")
    assert_trained_as_one_process(result, c, lr=c["lr"][optimizer], optimizer=optimizer, lr_schedule="cosine")
    assert result.steps == 15 and result.samples == 3 * 66 and not result.restarts
    splits = {tuple(r["split"]) for r in records.of("step") if sum(r["split"]) == 16}
    assert len(splits) == (1 if split == "even" or workers == 1 else workers)  # adaptive: a new cut every step


def test_eval_every_evaluates_the_model_of_that_step(runs):
    records = Records()
    result = runs.fit(callbacks=[records], workers=3, eval_every=3)
    assert_trained_as_one_process(result)
    evals = records.of("eval")
    assert [r["step"] for r in evals] == [3, 6, 9, 12]  # mid-epoch ones; an epoch's end has its own
    for r in evals:
        assert r["eval_loss"] == pytest.approx(eval_loss(reference(max_steps=r["step"])[0]), rel=1e-5)
        assert 0 <= r["eval_accuracy"] <= 1
    assert result.eval_losses == pytest.approx([eval_loss(reference(max_steps=s)[0]) for s in (5, 10, 15)], rel=1e-5)


def test_early_stop_mid_epoch_ends_the_run_at_that_evaluation(runs):
    """Patience 3 on eval accuracy, counted over mid-epoch and epoch-end evaluations alike (a tie
    does not improve): the run stops at the third evaluation in a row that does not beat the best,
    with the model of that step."""
    records = Records()
    settings = dict(epochs=6, lr=0.05, eval_every=2, early_stop_patience=3, early_stop_metric="eval_accuracy")
    result = runs.fit(callbacks=[records], workers=2, **settings)
    evaluations = sorted([(r["step"], r["eval_accuracy"]) for r in records.of("eval")]
                         + [(r["steps"], r["eval_accuracy"]) for r in records.of("epoch")])
    best, since, stop = None, 0, None
    for step, accuracy in evaluations:
        best, since = (accuracy, 0) if best is None or accuracy > best else (best, since + 1)
        if since == 3:
            stop = step
            break
    assert stop is not None and stop % 5, "no mid-epoch stop: the test needs another setting"
    (early,) = records.of("early_stop")
    assert early["step"] == stop == result.steps and early["best"] == best and early["evaluations"] == 3
    expected, _ = reference(epochs=6, lr=0.05, max_steps=stop)
    assert_same_parameters(result.model, expected)
    assert len(result.epoch_losses) == stop // 5 + 1  # the stopped epoch counts its steps run
    (last,) = [r for r in records.of("eval") if r["step"] == stop]
    assert result.eval_accuracies[-1] == last["eval_accuracy"]  # the stopped epoch's: that evaluation's


def test_max_steps_stops_mid_epoch_with_the_schedule_spanning_them(runs):
    result = runs.fit(workers=2, max_steps=7, lr_schedule="cosine")
    assert result.steps == 7 and result.samples == 66 + 2 * 16
    assert_trained_as_one_process(result, max_steps=7, lr_schedule="cosine")  # two epochs, the second of 2 steps


def test_checkpoint_every_and_a_resume_from_mid_epoch(runs, tmp_path):
    """Checkpoints every 4 steps and at each epoch's end; a run resumed from step 8's (mid-epoch 1)
    ends where an unbroken run does."""
    records = Records()
    run = tmp_path / "run"
    result = runs.fit(callbacks=[records], workers=2, output_dir=str(run), checkpoint_every=4, keep_checkpoints=10)
    assert_trained_as_one_process(result)
    assert [r["step"] for r in records.of("checkpoint")] == [4, 5, 8, 10, 12, 15]
    kept = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert kept == [f"step-{s:09d}.pt" for s in (4, 5, 8, 10, 12, 15)]
    # a run directory whose newest checkpoint is step 8's
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for step in (10, 12, 15):
        for path in (resumed / "checkpoints").glob(f"step-{step:09d}.pt*"):
            path.unlink()
    config = TrainConfig(**JOB, workers=3)
    again = Trainer(config, model_fn=MLP["model_fn"], dataset_fn=MLP["data"], loss_fn=MLP["loss_fn"],
                    eval_dataset_fn=EVAL, quiet=True, resume_from=str(resumed)).fit()
    assert again.resumed_from == 8
    assert_trained_as_one_process(again)
    assert again.eval_losses == pytest.approx(result.eval_losses, rel=1e-5)


# -- recovery ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 3])
def test_a_replica_lost_mid_epoch_is_replaced_and_its_step_redone(runs, workers):
    runs.setup = lambda group: group.lose(1, at_step=7)  # epoch 1, its third step
    result = runs.fit(workers=workers)
    assert_trained_as_one_process(result)  # a failure loses nothing
    (restart,) = result.restarts
    assert restart["step"] == 7 and restart["replicas"] == ["replica-1"] and restart["cause"] == "Killed"
    assert restart["replaced"] == ["replica-1"] and restart["dropped"] == [] and restart["workers"] == workers
    assert restart["recovery_s"] >= 0  # the first step after it is done
    assert result.steps_redone == 1  # the survivors computed step 7 twice
    (group,) = runs.groups  # recovered inside the loop: one group, started once
    assert group.replaced == [[1]] and group.rewired == 2


def test_a_replica_lost_in_the_first_step_is_replaced_and_the_step_redone(runs):
    runs.setup = lambda group: group.lose(0, at_step=0, during="run")  # its first run call, not its start
    result = runs.fit(workers=2)
    assert_trained_as_one_process(result)
    (restart,) = result.restarts
    assert restart["step"] == 0 and restart["replicas"] == ["replica-0"] and restart["replaced"] == ["replica-0"]


def test_a_replica_lost_during_an_evaluation_is_replaced_and_the_evaluation_done_again(runs):
    runs.setup = lambda group: group.lose(1, at_step=5, during="evaluate")  # epoch 0's evaluation, after step 5
    result = runs.fit(workers=2)
    assert_trained_as_one_process(result)
    (restart,) = result.restarts
    assert restart["step"] == 5 and restart["replicas"] == ["replica-1"] and result.steps_redone == 0
    expected, _ = reference()
    assert result.eval_losses[-1] == pytest.approx(eval_loss(expected), rel=1e-5)
    assert len(result.eval_losses) == JOB["epochs"]  # each epoch's evaluation once, the interrupted one redone


def test_a_replica_lost_while_it_sits_a_step_out_costs_no_step(runs):
    """Step 4 (2 samples) has no part for replica-2: the survivors apply it without replica-2's
    gradient, so they stand a step past the losses the driver gathered; those come with the snapshot."""
    runs.setup = lambda group: group.lose(2, at_step=4)
    result = runs.fit(workers=3)
    assert_trained_as_one_process(result)
    (restart,) = result.restarts
    assert restart["step"] == 5 and restart["replicas"] == ["replica-2"] and result.steps_redone == 0


def test_a_loss_found_after_the_last_step_is_recovered_and_nothing_redone(runs):
    runs.setup = lambda group: group.lose(1, at_step=15)  # found by the final calls (digests)
    result = runs.fit(workers=2)
    assert_trained_as_one_process(result)
    (restart,) = result.restarts
    assert restart["step"] == 15 and result.steps_redone == 0


def test_a_loss_at_a_checkpoint_is_recovered_before_it_is_written(runs, tmp_path):
    """Step 4's checkpoint (checkpoint_every) meets the loss: recovery first, then the checkpoint."""
    records = Records()
    runs.setup = lambda group: group.lose(0, at_step=4, during="snapshot")  # the first replica's state is saved
    result = runs.fit(callbacks=[records], workers=2, output_dir=str(tmp_path), checkpoint_every=4)
    assert_trained_as_one_process(result)
    assert [r["step"] for r in result.restarts] == [4]
    assert [r["step"] for r in records.of("checkpoint")] == [4, 5, 8, 10, 12, 15]


def test_a_loss_during_recovery_starts_it_over(runs):
    def setup(group):
        group.lose(1, at_step=7)
        for _ in range(2):  # its replacement is lost twice while it loads the survivor's state
            group.lose(1, during="copy_state")

    runs.setup = setup
    result = runs.fit(workers=3)
    assert_trained_as_one_process(result)
    (restart,) = result.restarts
    assert restart["step"] == 7 and restart["replicas"] == ["replica-1"]
    assert runs.groups[0].replaced == [[1], [1], [1]]


def test_a_loss_of_a_survivor_during_recovery_is_recovered_with_the_first(runs):
    def setup(group):
        group.lose(1, at_step=7)
        group.lose(2, at_step=7, during="positions")  # found while asking the survivors where they stand

    runs.setup = setup
    result = runs.fit(workers=3)
    assert_trained_as_one_process(result)
    (restart,) = result.restarts
    assert restart["replicas"] == ["replica-1", "replica-2"] and restart["replaced"] == ["replica-1", "replica-2"]
    assert runs.groups[0].replaced == [[1, 2]]


def test_replicas_that_keep_failing_while_recovering_stop_the_run(runs):
    def setup(group):
        group.lose(1, at_step=7)
        for _ in range(RecoveryPolicy().max_attempts):
            group.lose(1, during="copy_state")

    runs.setup = setup
    with pytest.raises(ReplicaError, match=r"replicas kept failing while recovering \(replica 1 died"):
        runs.fit(workers=2)


def test_every_replica_lost_stops_the_run(runs):
    def setup(group):
        group.lose(0, at_step=7)
        group.lose(1, at_step=7)

    runs.setup = setup
    with pytest.raises(ReplicaError, match=r"every replica was lost \(replica 0 died.*\); no checkpoint written"):
        runs.fit(workers=2)


def test_a_step_that_kills_its_replacement_again_stops_the_run(runs):
    def setup(group):
        group.lose(1, at_step=7)
        group.lose(1, at_step=7)  # the replacement too, redoing step 7

    runs.setup = setup
    with pytest.raises(ReplicaError, match="again at step 7, as before its replacement: that step itself kills it"):
        runs.fit(workers=2)
    assert runs.groups[0].replaced == [[1]]


def test_a_replica_dropped_for_want_of_room_leaves_the_run_on_fewer(runs):
    def setup(group):
        group.lose(1, at_step=7)
        group.no_room.add(1)

    runs.setup = setup
    result = runs.fit(workers=3)
    assert_trained_as_one_process(result)  # the result does not depend on the number of replicas
    (restart,) = result.restarts
    assert restart["dropped"] == ["replica-1"] and restart["replaced"] == [] and restart["workers"] == 2
    assert len(result.replica_digests) == 2


@pytest.mark.parametrize("output_dir", [True, False], ids=["checkpoint", "no_output_dir"])
def test_fewer_than_min_workers_stop_with_a_checkpoint_to_resume_from(runs, tmp_path, output_dir):
    def setup(group):
        group.lose(1, at_step=7)
        group.no_room.add(1)

    runs.setup = setup
    run = tmp_path / "run"
    settings = dict(workers=2, min_workers=2, output_dir=str(run) if output_dir else None)
    hint = (f"; checkpoint {re.escape(str(run / 'checkpoints' / 'step-000000007.pt'))}; resume with --resume "
            f"{re.escape(str(run))}$" if output_dir
            else r" \(set output_dir to keep a checkpoint\)$")
    with pytest.raises(ReplicaError, match=r"^1 replica left, fewer than min_workers=2" + hint):
        runs.fit(**settings)
    if output_dir:  # nothing was lost: the run resumed from there ends where an unbroken run does
        runs.setup = lambda group: None
        config = TrainConfig(**JOB, workers=2, min_workers=2)
        result = Trainer(config, model_fn=MLP["model_fn"], dataset_fn=MLP["data"], loss_fn=MLP["loss_fn"],
                         eval_dataset_fn=EVAL, quiet=True, resume_from=str(run)).fit()
        assert result.resumed_from == 7
        assert_trained_as_one_process(result)


def test_a_run_stopped_below_min_workers_tells_its_callbacks_and_metrics_jsonl_the_loss(runs, tmp_path):
    def setup(group):
        group.lose(1, at_step=7)
        group.no_room.add(1)

    runs.setup = setup
    records, run = Records(), tmp_path / "run"
    with pytest.raises(ReplicaError, match="fewer than min_workers=2"):
        runs.fit(callbacks=[records], workers=2, min_workers=2, output_dir=str(run))
    (lost,) = records.of("replica_lost")
    assert (lost["replicas"], lost["step"], lost["dropped"], lost["workers"]) == (["replica-1"], 7, ["replica-1"], 1)
    written = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["replicas"], r["step"]) for r in written if r["event"] == "replica_lost"] == [(["replica-1"], 7)]


def test_replicas_lost_while_starting_or_restoring_are_replaced_before_any_step(runs, tmp_path):
    run = tmp_path / "run"
    runs.setup = lambda group: group.lose(0, during="settle")
    first = runs.fit(workers=2, output_dir=str(run), max_steps=8)  # max_steps defines the run: resume with it
    (restart,) = first.restarts
    assert restart["phase"] == "starting" and restart["replicas"] == ["replica-0"] and restart["step"] is None
    assert_trained_as_one_process(first, max_steps=8)
    for path in (run / "checkpoints").glob("step-000000008.pt*"):  # resume from step 5's
        path.unlink()
    runs.setup = lambda group: group.lose(1, during="restore")
    config = TrainConfig(**JOB, workers=2, max_steps=8)
    again = Trainer(config, model_fn=MLP["model_fn"], dataset_fn=MLP["data"], loss_fn=MLP["loss_fn"],
                    eval_dataset_fn=EVAL, quiet=True, resume_from=str(run)).fit()
    assert again.resumed_from == 5
    assert [r.get("phase") for r in again.restarts] == ["starting", "restoring"]  # the first run's, kept
    assert_trained_as_one_process(again, max_steps=8)


# -- until_settled -----------------------------------------------------------------------------------------


def group_of(workers: int) -> FakeGroup:
    """A FakeGroup of `workers` replicas of the MLP case, as Trainer would make it."""
    config = TrainConfig(**JOB, workers=workers)
    torch.manual_seed(config.seed)
    init = MLP["model_fn"]().state_dict()
    return FakeGroup(config, model_fn=MLP["model_fn"], loss_fn=MLP["loss_fn"], init_state=init,
                     train_set=MLP["data"](), eval_set=None, total_steps=15)


def test_until_settled_replaces_the_lost_and_asks_again():
    group = group_of(2)
    group.lose(1, during="settle")  # settle names the lost ranks
    group.lose(1, during="liveness")  # a call's loss does not: dead() finds them
    calls = []

    def start():
        calls.append(len(calls))
        group.settle()
        group.liveness()

    records = until_settled(start, group, RecoveryPolicy(), "starting")
    assert calls == [0, 1, 2] and group.replaced == [[1], [1]]
    assert [(r["phase"], r["replicas"], r["replaced"], r["step"]) for r in records] == [
        ("starting", ["replica-1"], ["replica-1"], None)] * 2
    assert [r["cause"] for r in records] == ["Killed", "Killed"]


def test_until_settled_gives_up_after_max_attempts():
    group = group_of(2)
    for _ in range(5):
        group.lose(1, during="settle")
    with pytest.raises(ReplicaError, match=r"^replicas kept failing while recovering \(.*\) while starting$"):
        until_settled(group.settle, group, RecoveryPolicy(max_attempts=3), "starting")
    assert group.replaced == [[1]] * 3


def test_until_settled_stops_below_min_workers():
    group = group_of(2)
    group.lose(1, during="restore")
    group.no_room.add(1)
    with pytest.raises(ReplicaError, match=r"^1 replica left, fewer than min_workers=2 while restoring$"):
        until_settled(partial(group.restore, group.snapshot()), group, RecoveryPolicy(min_workers=2), "restoring")


def test_until_settled_passes_other_errors_through():
    group = group_of(1)

    def fails():
        raise ReplicaError("replica 0 failed in run: ValueError: bad sample")

    with pytest.raises(ReplicaError, match="bad sample"):
        until_settled(fails, group, RecoveryPolicy(), "starting")
    assert group.replaced == []
