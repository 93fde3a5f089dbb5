"""--profile-steps A:B: the range's validation, the replica's step profiler on its own, and a real
run on 2 replicas whose traces and breakdown come back, with the same parameters as without."""

import gzip
import json
from functools import partial
from pathlib import Path

import pytest
import torch

from faults import die_once
from raytorch import ConfigError, TrainConfig, Trainer
from raytorch.cli import parse_config
from raytorch.replica.profiler import PHASES, StepProfiler, breakdown, profile_line
from raytorch.tasks.builtin import classification_data, mlp
from reference import assert_same_parameters, train_reference

DATA = partial(classification_data, 96, 4)
MODEL = partial(mlp, 16, 4, hidden=16)
# 96 samples in batches of 16: 6 steps an epoch, 12 in all; even split: reruns are bit-identical
JOB = dict(workers=2, epochs=2, batch_size=16, lr=0.05, seed=3, split="even")


@pytest.mark.parametrize("text, says", [
    ("5:3", "A must be less than B"), ("0:0", "A must be less than B"), ("x", "must be A:B"),
    ("-1:4", "must be A:B"), ("1:2:3", "must be A:B"), ("", "must be A:B"),
])
def test_a_range_that_is_not_A_below_B_is_refused(tmp_path, text, says):
    with pytest.raises(ConfigError, match=f"^profile_steps: {says}.*got {text!r}"):
        TrainConfig(profile_steps=text, output_dir=str(tmp_path))


def test_profiling_needs_output_dir():
    with pytest.raises(ConfigError, match="^profile_steps: .*set output_dir too"):
        TrainConfig(profile_steps="5:10")


def test_the_flag_gives_the_range(tmp_path):
    config = parse_config(["--profile-steps", "5:10", "--output-dir", str(tmp_path)])
    assert config.profile_steps == "5:10" and config.profile_range == (5, 10)
    assert TrainConfig().profile_range is None


def test_the_profiler_keeps_the_window_and_traces_it():
    """Steps 0..5 with window 2:4: the seconds of steps 2 and 3 only, a trace of their phases; a
    step computed again (after a restore) is timed afresh, not twice."""
    profiler = StepProfiler((2, 4), torch.device("cpu"))
    for step in range(6):
        for phase in PHASES:
            with profiler.phase(phase, step) as elapsed:
                torch.ones(64, 64).mm(torch.ones(64, 64))
            assert elapsed.seconds > 0
        profiler.applied(step)
        assert profiler.recording == (step in (2,))  # started by step 2's first phase, stopped after step 3
    assert sorted(profiler.seconds) == [2, 3]
    before = dict(profiler.seconds[3])
    profiler.from_step(3)  # restored to 3 updates: step 3 runs again
    assert sorted(profiler.seconds) == [2]
    with profiler.phase("fetch", 3):
        pass
    assert before["forward_backward"] > 0 and profiler.seconds[3]["forward_backward"] == 0.0
    report = profiler.report()
    names = {event["name"] for event in json.loads(gzip.decompress(report["trace"]))["traceEvents"]}
    assert {f"raytorch.{phase}" for phase in PHASES} <= names


def test_no_window_no_trace():
    profiler = StepProfiler(None, torch.device("cpu"))
    with profiler.phase("allreduce", 0) as elapsed:
        pass
    assert elapsed.seconds >= 0 and profiler.report() == {"seconds": {}, "trace": None}


def test_the_breakdown_is_mean_ms_per_step():
    seconds = {3: {"fetch": 0.001, "forward_backward": 0.010, "allreduce": 0.002, "optimizer": 0.0},
               4: {"fetch": 0.003, "forward_backward": 0.020, "allreduce": 0.004, "optimizer": 0.002}}
    assert breakdown(seconds) == pytest.approx({"fetch": 2.0, "forward_backward": 15.0, "allreduce": 3.0,
                                                "optimizer": 1.0})
    line = profile_line("replica-0", {"steps": [3, 4], "ms": breakdown(seconds), "trace": "/run/profile/r.json"},
                        (3, 5))
    assert line == ("profile replica-0 (steps 3-4): fetch 2.0 ms, forward+backward 15.0 ms, all-reduce 3.0 ms, "
                    "optimizer 1.0 ms; trace /run/profile/r.json")
    assert "none of steps 3-4 ran here" in profile_line("replica-1", {"steps": [], "ms": breakdown({}),
                                                                      "trace": None}, (3, 5))


def fit(model_fn=MODEL, **overrides):
    config = TrainConfig(**JOB, **overrides)
    return Trainer(config, model_fn=model_fn, dataset_fn=DATA, loss_fn=torch.nn.functional.cross_entropy,
                   quiet=True).fit()


def test_a_profiled_run_writes_a_trace_per_replica_and_trains_the_same(ray_local, tmp_path):
    profiled = fit(profile_steps="3:6", output_dir=str(tmp_path / "profiled"))
    plain = fit(output_dir=str(tmp_path / "plain"))
    assert profiled.steps == plain.steps == 12
    assert set(profiled.profile) == {"replica-0", "replica-1"} and plain.profile == {}
    for name, profile in profiled.profile.items():
        assert profile["steps"] == [3, 4, 5]
        assert set(profile["ms"]) == set(PHASES) and profile["ms"]["forward_backward"] > 0
        trace = tmp_path / "profiled" / "profile" / f"{name}.json"
        assert profile["trace"] == str(trace)
        names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
        assert {"raytorch.forward_backward", "raytorch.allreduce"} <= names
    # profiling changes no number: the same parameters, bit for bit
    expected = plain.model.state_dict()
    for key, value in profiled.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert profiled.epoch_losses == plain.epoch_losses


class DiesInStep(torch.nn.Module):
    """The MLP, whose replica dies once (one per run: faults.die_once) in its `forwards`-th training
    forward: with the even split and no accumulation, in global step forwards - 1."""

    def __init__(self, folder: str, forwards: int):
        super().__init__()
        self.net, self.folder, self.forwards, self.seen = MODEL(), folder, forwards, 0

    def forward(self, x):
        if self.training:
            self.seen += 1
            if self.seen == self.forwards:
                die_once(self.folder, "profiled")
        return self.net(x)


def test_a_replica_lost_in_the_profiled_steps_leaves_a_partial_trace(ray_local, tmp_path):
    """Lost in step 4 of 3:7: the run recovers and trains what plain PyTorch trains; the
    survivor's profile covers all the steps (step 4 timed again, once), the replacement's those from
    the step it joined at, in a trace of its own (the lost replica's went with it)."""
    model_fn = partial(DiesInStep, str(tmp_path), 5)
    result = fit(profile_steps="3:7", output_dir=str(tmp_path / "run"), model_fn=model_fn)
    [restart] = result.restarts
    assert (tmp_path / "profiled.claimed").exists() and restart["step"] == 4
    expected, losses = train_reference(MODEL, DATA(), torch.nn.functional.cross_entropy, optimizer="adam",
                                       **{key: JOB[key] for key in ("epochs", "batch_size", "lr", "seed")})
    assert_same_parameters(result.model.net, expected)
    assert result.epoch_losses == pytest.approx(losses, rel=1e-5)
    survivor, replacement = sorted(result.profile.values(), key=lambda profile: len(profile["steps"]), reverse=True)
    assert survivor["steps"] == [3, 4, 5, 6] and replacement["steps"] == [4, 5, 6]
    for profile in (survivor, replacement):
        names = {event.get("name") for event in json.loads(Path(profile["trace"]).read_text())["traceEvents"]}
        assert "raytorch.forward_backward" in names and profile["ms"]["forward_backward"] > 0
