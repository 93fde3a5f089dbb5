"""A replica's exception and a replica's repeated timeouts, without Ray (Trainer.fit on in-process
FakeGroups, as in test_driver_unit.py): an exception is retried once from the other replicas'
state and the run ends as one process's does; the same step failing again stops it, naming the
replica, the step and where to resume; --on-error stop stops at once; a replica that times out
max_hangs times is not replaced again (the run goes on without it, or stops below min_workers)."""

import json

import pytest

from raytorch import ReplicaError
from raytorch.driver.policy import MAX_HANGS, RecoveryPolicy
from raytorch.errors import NonFiniteError, PeerError
from test_driver_unit import Records, assert_trained_as_one_process
from test_driver_unit import runs as runs  # noqa: F401  (the fixture)
from test_run_plan_and_recovery import failure  # a Failure of replica-1 at step 40, fields overridden

pytestmark = pytest.mark.unit


# -- the policy, pure ------------------------------------------------------------------------------------------


def test_policy_retries_an_error_of_a_known_replica_with_another_to_copy_from():
    policy = RecoveryPolicy()
    assert policy.retries(ReplicaError("boom", rank=1, step=4), workers=2)
    assert not policy.retries(ReplicaError("boom", rank=1, step=4), workers=1)  # nobody to take the state from
    assert not policy.retries(ReplicaError("a replica failed: boom"), workers=2)  # which replica: unknown
    assert not policy.retries(NonFiniteError("nan", rank=1, step=4), workers=2)  # on_nonfinite decides those
    assert not policy.retries(PeerError("peer gone", rank=1, step=4), workers=2)  # a consequence, not a cause
    assert not RecoveryPolicy(on_error="stop").retries(ReplicaError("boom", rank=1, step=4), workers=2)


def test_policy_stops_a_step_that_fails_again_after_its_retry_whichever_replica_raises():
    policy, raised = RecoveryPolicy(), "replica 0 failed in run after 40 steps: ValueError: x"
    again = {"step": 40, "replicas": ["replica-1"], "cause": "error"}
    decision = policy.decide(failure(raised=raised, replicas=["replica-0"], previous=again))
    assert not decision.recover and decision.reason == f"{raised}; step 40 failed again after a retry"
    assert policy.decide(failure(raised=raised, previous={**again, "step": 39})).recover  # another step: a new fault
    assert policy.decide(failure(raised=raised, previous={**again, "cause": "hang", "replicas": []})).recover


def test_policy_caps_the_timeouts_of_one_replica():
    policy = RecoveryPolicy()
    hung = dict(hung=("replica-1",), hangs_before={"replica-1": MAX_HANGS - 2})
    assert policy.decide(failure(**hung)).capped == ()
    decision = policy.decide(failure(hung=("replica-1",), hangs_before={"replica-1": MAX_HANGS - 1}))
    assert decision.recover and decision.capped == ("replica-1",)
    assert policy.decide(failure(hangs_before={"replica-1": 9})).capped == ()  # died this time: replaced


# -- the driver, on in-process replicas ------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 3])
def test_an_exception_in_a_replica_is_retried_once_and_the_run_ends_as_one_process(runs, workers):
    records = Records()
    runs.setup = lambda group: group.fail(1, at_step=7)
    result = runs.fit(workers=workers, callbacks=[records])
    assert_trained_as_one_process(result)
    (restart,) = result.restarts
    assert restart["cause"] == "error" and restart["replicas"] == ["replica-1"] and restart["step"] == 7
    assert "RuntimeError: raised by the test" in restart["error"]
    assert restart["replaced"] == ["replica-1"] and restart["workers"] == workers
    assert [r["cause"] for r in records.of("replica_lost")] == ["error"]
    assert runs.groups[0].replaced == [[1]]


def test_the_same_step_failing_again_after_its_retry_stops_naming_the_replica_and_where_to_resume(runs, tmp_path):
    def setup(group):
        group.fail(1, at_step=7)
        group.fail(1, at_step=7)  # its replacement fails at step 7 too

    runs.setup = setup
    run = tmp_path / "run"
    with pytest.raises(ReplicaError) as stopped:
        runs.fit(workers=2, output_dir=str(run), checkpoint_every=5)
    message = str(stopped.value)
    assert message.startswith("replica 1 failed in run after 7 steps: RuntimeError: raised by the test; step 7 "
                              "failed again after a retry")
    assert f"resume with --resume {run}" in message and "step-000000005.pt" in message
    assert (stopped.value.rank, stopped.value.step) == (1, 7)
    assert runs.groups[0].replaced == [[1]]  # retried once
    # the first failure's record is in the run's event log, though its retry never finished
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["cause"] for e in events if e.get("event") == "replica_lost"] == ["error"]


def test_on_error_stop_ends_the_run_at_the_first_exception(runs):
    runs.setup = lambda group: group.fail(1, at_step=7)
    with pytest.raises(ReplicaError, match=r"^replica 1 failed in run after 7 steps: RuntimeError: raised by the "
                                           r"test"):
        runs.fit(workers=2, on_error="stop")
    assert runs.groups[0].replaced == []


def test_an_exception_with_one_replica_stops_with_nothing_to_retry_from(runs):
    runs.setup = lambda group: group.fail(0, at_step=3)
    with pytest.raises(ReplicaError, match=r"^replica 0 failed in run after 3 steps"):
        runs.fit(workers=1)
    assert runs.groups[0].replaced == []


def test_a_replica_that_keeps_timing_out_is_not_replaced_again_and_the_run_goes_on_without_it(runs, capsys):
    def setup(group):
        for step in range(2, 2 + MAX_HANGS):  # a replica on a slow node: its replacement lands there too
            group.hang(1, at_step=step)

    runs.setup = setup
    result = runs.fit(workers=3)
    assert_trained_as_one_process(result)  # the result does not depend on the number of replicas
    assert [r["replicas"] for r in result.restarts] == [["replica-1"]] * MAX_HANGS
    assert [r["capped"] for r in result.restarts] == [[]] * (MAX_HANGS - 1) + [["replica-1"]]
    assert result.restarts[-1]["dropped"] == ["replica-1"] and result.restarts[-1]["workers"] == 2
    assert len(result.replica_digests) == 2
    assert runs.groups[0].replaced == [[1]] * MAX_HANGS


def test_the_timeout_cap_below_min_workers_stops_saying_which_replica(runs, tmp_path):
    def setup(group):
        for step in range(2, 2 + MAX_HANGS):
            group.hang(1, at_step=step)

    runs.setup = setup
    with pytest.raises(ReplicaError, match=rf"^replica-1 timed out {MAX_HANGS} times and is not replaced again: "
                                           r"1 replica left, fewer than min_workers=2; checkpoint .*; resume with"):
        runs.fit(workers=2, min_workers=2, output_dir=str(tmp_path / "run"))
