"""`raytorch train --submit`: the job's command and its exit code, without a cluster (a job run on
a real `ray start --head` cluster: test_dashboard.py)."""

from types import SimpleNamespace

import pytest
from ray.job_submission import JobStatus

from raytorch.submit import exit_code, job_command


class Jobs:
    """What JobSubmissionClient.get_job_info answers for one job, in turn (the last one stays)."""

    def __init__(self, *infos):
        self.infos = list(infos)

    def get_job_info(self, job_id):
        return self.infos.pop(0) if len(self.infos) > 1 else self.infos[0]


def info(status, message="", driver_exit_code=None):
    return SimpleNamespace(status=status, message=message, driver_exit_code=driver_exit_code)


def test_a_job_that_succeeded_exits_0_after_it_ends(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    assert exit_code(Jobs(info(JobStatus.RUNNING), info(JobStatus.SUCCEEDED)), "raysubmit_1") == 0


@pytest.mark.parametrize("driver_exit_code, expected", [(2, 2), (None, 1), (0, 1)])
def test_a_job_that_failed_says_so_and_exits_with_its_drivers_code(capsys, driver_exit_code, expected):
    jobs = Jobs(info(JobStatus.FAILED, "8 replicas of 1 CPU each cannot fit", driver_exit_code))
    assert exit_code(jobs, "raysubmit_2") == expected
    assert capsys.readouterr().err == "raytorch: job raysubmit_2 failed: 8 replicas of 1 CPU each cannot fit\n"


def test_a_stopped_job_is_not_a_success(capsys):
    assert exit_code(Jobs(info(JobStatus.STOPPED)), "raysubmit_3") == 1
    assert capsys.readouterr().err == "raytorch: job raysubmit_3 stopped\n"


def test_the_job_runs_the_command_without_the_submission_flags():
    flags = ["--submit", "--address", "http://127.0.0.1:8265", "--epochs", "2", "--detach", "--address=x"]
    assert job_command(flags) == "python -m raytorch.cli train --epochs 2"
