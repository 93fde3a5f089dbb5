"""The pure parts of the driver, without Ray: the run plan, the recovery decision, and a
checkpoint's round trip of a snapshot and a position."""

import math

import pytest
import torch

from raytorch import CheckpointError, ConfigError, TrainConfig
from raytorch.core.position import Position
from raytorch.core.runplan import RunPlan
from raytorch.core.sharding import epoch_order
from raytorch.core.snapshot import Snapshot
from raytorch.driver.policy import Failure, RecoveryPolicy
from raytorch.persist.checkpoint import RunCheckpoints


def test_run_plan_counts_steps_and_cuts_the_last_epoch_at_max_steps():
    plan = RunPlan.of(TrainConfig(workers=1, epochs=3, batch_size=4, max_steps=7), train_size=10)
    assert (plan.steps_per_epoch, plan.total_steps, plan.epochs) == (3, 7, 3)
    assert [len(plan.batches_of(e)) for e in range(3)] == [3, 3, 1]
    assert [plan.first_step(e) for e in range(3)] == [0, 3, 6]
    # samples behind each epoch's end: two whole epochs of 10, then the cut epoch's one full batch
    assert [plan.samples_through(e) for e in (-1, 0, 1, 2)] == [0, 10, 20, 24]


def test_run_plan_batches_follow_the_epoch_order():
    plan = RunPlan.of(TrainConfig(workers=1, epochs=2, batch_size=4, seed=5), train_size=10)
    batches = plan.batches_of(1)
    assert torch.equal(torch.cat(batches), epoch_order(10, seed=5, epoch=1))
    assert [len(b) for b in batches] == [4, 4, 2]


def test_run_plan_with_drop_last_counts_full_batches_only():
    plan = RunPlan.of(TrainConfig(workers=1, epochs=2, batch_size=4, drop_last=True, accumulate=1), train_size=10)
    assert (plan.steps_per_epoch, plan.total_steps) == (2, 4)
    assert plan.samples_through(1) == 16


def test_run_plan_refuses_a_run_without_steps():
    with pytest.raises(ConfigError, match="batch_size: 12 samples per step exceed the 10 training samples"):
        RunPlan.of(TrainConfig(workers=1, batch_size=6, accumulate=2, drop_last=True), train_size=10)


def failure(**overrides):
    values = dict(lost="replica 1 died", replicas=["replica-1"], attempt=0, survivors=1, step=40, previous=None)
    return Failure(**{**values, **overrides})


def test_policy_recovers_a_first_loss():
    assert RecoveryPolicy().decide(failure()).recover


def test_policy_gives_up_when_no_replica_survives():
    decision = RecoveryPolicy().decide(failure(survivors=0, step=None))
    assert not decision.recover and decision.reason == "every replica was lost (replica 1 died)"


def test_policy_gives_up_when_the_same_step_kills_the_same_replica_again():
    previous = {"step": 40, "replicas": ["replica-1"]}
    decision = RecoveryPolicy().decide(failure(previous=previous))
    assert not decision.recover and "again at step 40, as before its replacement" in decision.reason
    # another step, or another replica: a new fault, recovered
    assert RecoveryPolicy().decide(failure(previous={"step": 39, "replicas": ["replica-1"]})).recover
    assert RecoveryPolicy().decide(failure(previous={"step": 40, "replicas": ["replica-0"]})).recover


def test_policy_gives_up_after_its_attempts():
    policy = RecoveryPolicy(max_attempts=3)
    assert policy.decide(failure(attempt=2)).recover
    decision = policy.decide(failure(attempt=3))
    assert not decision.recover and decision.reason.startswith("replicas kept failing while recovering")


def test_policy_stops_below_min_workers():
    policy = RecoveryPolicy(min_workers=2)
    assert policy.after_replacement(2).recover
    decision = policy.after_replacement(1)
    assert not decision.recover and decision.reason == "1 replica left, fewer than min_workers=2"


def position():
    at = Position(epoch=1, epoch_losses=[2.0], eval_losses=[1.5], best=1.5, restarts=[{"step": 3, "replicas": []}],
                  skipped=[2])
    for loss, samples in [(1.0, 4), (math.nan, 4), (0.5, 2)]:
        at.add(loss, samples)
    return at


def test_a_checkpoint_holds_the_snapshot_and_the_position(tmp_path):
    config = TrainConfig(workers=1, output_dir=str(tmp_path))
    snapshot = Snapshot(model={"w": torch.ones(2)}, optimizer={"state": {}, "param_groups": []}, schedule={},
                        rng=torch.get_rng_state(), scaler=None, steps=5, losses={4: 0.1})
    checkpoints = RunCheckpoints(tmp_path, config, say=print)
    assert checkpoints.kept() == "no checkpoint written yet"
    path = checkpoints.save(snapshot, position(), first_step=3)  # epoch 1 starts at step 3: 2 of its steps done
    assert checkpoints.kept() == f"last good checkpoint {path}: resume with --resume {tmp_path}"

    restored, at = RunCheckpoints(tmp_path, config, say=print).resume(tmp_path)
    assert restored.steps == 5 and restored.losses == {}  # the losses log is not part of a checkpoint
    assert torch.equal(restored.model["w"], snapshot.model["w"]) and torch.equal(restored.rng, snapshot.rng)
    assert (at.epoch, at.index, at.counts, at.skipped, at.best) == (1, 2, [4, 4], [2], 1.5)
    assert at.losses[0] == 1.0 and math.isnan(at.losses[1]) and at.running_loss() == 1.0
    assert at.restarts == [{"step": 3, "replicas": []}]


def test_resume_refuses_other_run_defining_fields(tmp_path):
    snapshot = Snapshot(model={}, optimizer={}, schedule={}, rng=torch.get_rng_state(), scaler=None, steps=1)
    RunCheckpoints(tmp_path, TrainConfig(workers=1, lr=0.1), say=print).save(snapshot, Position(), first_step=0)
    checkpoints = RunCheckpoints(tmp_path, TrainConfig(workers=3, lr=0.2), say=print)
    with pytest.raises(CheckpointError, match=r"was trained with lr=0.1, this run asks for 0.2"):
        checkpoints.resume(tmp_path)
    RunCheckpoints(tmp_path, TrainConfig(workers=3, lr=0.1), say=print).resume(tmp_path)  # workers may differ


def test_a_checkpoint_from_before_recipes_named_the_model_resumes_with_the_datasets_model(tmp_path):
    """A CLI run of a built-in dataset without --model recorded model None; the CLI now fills in
    the dataset's model from its recipe (digits: mlp): the same model, so the resume goes on."""
    snapshot = Snapshot(model={}, optimizer={}, schedule={}, rng=torch.get_rng_state(), scaler=None, steps=1)
    RunCheckpoints(tmp_path, TrainConfig(workers=1, dataset="digits"), say=print).save(snapshot, Position(), 0)
    RunCheckpoints(tmp_path, TrainConfig(workers=1, dataset="digits", model="mlp"), say=print).resume(tmp_path)
    RunCheckpoints(tmp_path, TrainConfig(workers=1, dataset="digits"), say=print).resume(tmp_path)  # the API's
    with pytest.raises(CheckpointError, match=r"was trained with model='mlp', this run asks for 'linear'"):
        RunCheckpoints(tmp_path, TrainConfig(workers=1, dataset="digits", model="linear"), say=print).resume(tmp_path)


def test_the_frame_a_hung_replica_is_stuck_in_is_read_from_its_py_spy_dump():
    from raytorch.core.naming import stuck_in

    dump = """Process 4242: ray::Replica.run
Python v3.11.7 (/usr/bin/python3.11)

Thread 4242 (idle): "MainThread"
    main_loop (ray/_private/worker.py:946)
    <module> (ray/_private/workers/default_worker.py:330)
Thread 4300 (idle): "Thread-2"
    wait (torch/distributed/distributed_c10d.py:4321)
    finish (raytorch/wire/collective.py:80)
    run (raytorch/replica/actor.py:159)
Thread 4301 (idle): "health"
    ping (raytorch/health.py:10)
"""
    assert stuck_in(dump) == "; stuck in wait (torch/distributed/distributed_c10d.py:4321)"
    elsewhere = dump.replace("replica/actor.py", "replica/other.py")  # no thread runs the replica's calls
    assert stuck_in(elsewhere) == "; stuck in main_loop (ray/_private/worker.py:946)"
    assert stuck_in(None) == "" and stuck_in("py-spy: permission denied") == ""
