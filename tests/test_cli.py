"""The driver script end to end, and bad input: one line, non-zero exit, before any work is lost."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from torch.nn.functional import mse_loss

from polling import wait_for
from raytorch import ClusterError, TrainConfig, Trainer
from raytorch.cli import main
from raytorch.tasks.builtin import linear, linear_data

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD_S = 240  # a guard against hangs, not a timing assertion


def run_script(*args, cwd=ROOT, ray_dir=None):
    """scripts/train.py; the local Ray it starts keeps its files (session, logs) under `ray_dir`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_dir is not None:
        env["RAY_TMPDIR"] = str(ray_dir)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.fixture
def ray_dir():
    """A directory of the test's own for the files of a Ray a script starts (its session's logs: not
    those of whichever Ray of this machine /tmp/ray/session_latest names); short, for Ray's sockets."""
    path = tempfile.mkdtemp(prefix="rt-cli-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.system
def test_default_job_reproduces_the_seed_note(ray_dir):
    proc = run_script(ray_dir=ray_dir)
    assert proc.returncode == 0, proc.stderr
    epochs = re.findall(r"^Epoch (\d+): loss=([\d.]+) \(w=([-\d.]+), b=([-\d.]+)\)$", proc.stdout, re.M)
    assert [int(e[0]) for e in epochs] == list(range(10))
    w, b = float(epochs[-1][2]), float(epochs[-1][3])
    assert abs(w - 2) < 0.01 and abs(b - 1) < 0.05, proc.stdout
    final = re.search(r"^Final loss is: ([\d.]+)$", proc.stdout, re.M)
    assert final and float(final.group(1)) < 0.01
    # the local Ray stayed on loopback
    assert re.search(r"^Run raytorch-[\w-]+: Ray at 127\.0\.0\.1:\d+", proc.stdout, re.M)
    assert re.search(r"^Done: 1000 steps on 2 replicas in [\d.]+ s \([\d,]+ samples/s\); last epoch loss [\d.]+, "
                     r"eval loss [\d.]+$", proc.stdout, re.M)
    # progress went to the first replica's actor log (the dashboard's Actors page), not twice to the console
    assert "[raytorch progress]" not in proc.stdout + proc.stderr
    logs = ray_dir / "ray" / "session_latest" / "logs"  # the session of the Ray this run started
    assert list(logs.glob("worker-*.err")), sorted(p.name for p in logs.parent.parent.iterdir())
    marked = [line for path in logs.glob("worker-*.err") for line in path.read_text(errors="replace").splitlines()
              if line.startswith("[raytorch progress] epoch")]
    assert sum(" done," in line for line in marked) == 10, marked  # one at each epoch's end
    # the adaptive split's closing line: each replica's share of the samples. How even it is depends
    # on how fast each replica really was (a loaded machine slows one): that it stays even for equal
    # replicas is checked without timing, in tests/test_split.py (noise moves no cut point; a move
    # must save meaningful time per step)
    split = re.search(r"^split of the samples: replica-0 ([\d.]+)% .*replica-1 ([\d.]+)% ", proc.stdout, re.M)
    assert split and abs(float(split.group(1)) + float(split.group(2)) - 100) < 0.2, proc.stdout


@pytest.mark.parametrize("args,field", [
    (["--workers", "0"], "workers"),
    (["--batch-size", "1"], "batch_size"),
    (["--lr", "0"], "lr"),
    (["--optimizer", "rmsprop"], "optimizer"),
    (["--model", "resnet"], "model"),
    (["--dataset", "imagenet"], "dataset"),
])
def test_bad_flags_get_one_line_naming_the_field(capsys, args, field):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raytorch: error: {field}: ") and "\n" not in err


@pytest.mark.parametrize("args,line", [
    (["--tensorboard"], "tensorboard: needs the tensorboard package: pip install 'raytorch[tensorboard]'"),
    (["--output-dir", "nope://bucket/run"], "output_dir: unknown storage protocol 'nope' in nope://bucket/run"),
])
@pytest.mark.parametrize("command", [["train"], ["config", "show"]])
def test_what_the_machine_lacks_gets_one_line_before_any_work(capsys, monkeypatch, tmp_path, args, line, command):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard: ImportError
    if "--tensorboard" in args:
        args = [*args, "--output-dir", str(tmp_path)]
    assert main([*command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raytorch: error: {line}") and "\n" not in err
    assert not list(tmp_path.iterdir())  # nothing written: checked before the run started


@pytest.mark.parametrize("args", [
    ["--model", "nosuch:thing"],  # your model cannot be imported
    ["--dataset", "user_code:data"],  # your dataset, and no model of yours
    ["--callback", "nosuch:Recorder"],  # a callback that cannot be made
    ["--detach"],  # without --submit
])
def test_config_show_fails_as_train_fails_before_ray_starts(capsys, args):
    assert main(["train", *args]) == 2
    refused = capsys.readouterr().err
    assert refused.startswith("raytorch: error: ") and refused.count("\n") == 1, refused
    assert main(["config", "show", *args]) == 2
    shown = capsys.readouterr()
    assert (shown.out, shown.err) == ("", refused)


def test_bad_config_file(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key(s) learning_rate" in err and "\n" not in err


def test_unknown_command(capsys):
    assert main(["fit"]) == 2
    assert "raytorch train" in capsys.readouterr().err


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.system
def test_unreachable_address_fails_fast():
    proc = run_script("--address", f"127.0.0.1:{_closed_port()}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raytorch: error: cannot reach a Ray cluster at 127.0.0.1:")


def test_more_workers_than_the_cluster_holds(ray_local):
    config = TrainConfig(workers=64, batch_size=64, resource_timeout=0)
    with pytest.raises(ClusterError, match=r"64 replicas of 1 CPU each cannot fit: the cluster has 1 node\(s\) "
                                           r"with 4 CPU and 0 GPU in all \(room for 4\)"):
        Trainer(config, model_fn=linear, dataset_fn=lambda: linear_data(100, 0), loss_fn=mse_loss, quiet=True).fit()
    # and nothing is left reserved: the refused run's placement group is gone, every CPU free
    import ray

    assert not [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    wait_for(lambda: ray.available_resources().get("CPU", 0) == 4, "every CPU free")


def test_cuda_on_a_cluster_without_gpus(ray_local):
    config = TrainConfig(workers=2, batch_size=2, device="cuda")
    with pytest.raises(ClusterError, match=r"device 'cuda' asked for, but the cluster has no GPU \(4 CPU, 0 GPU\): "
                                           r"use --device cpu \(or auto\)"):
        Trainer(config, model_fn=linear, dataset_fn=lambda: linear_data(10, 0), loss_fn=mse_loss, quiet=True).fit()


def test_batch_larger_than_dataset_with_drop_last(ray_local):
    from raytorch import ConfigError

    config = TrainConfig(workers=2, batch_size=50, drop_last=True)
    with pytest.raises(ConfigError, match="batch_size: 50 samples per step exceed the 10 training samples"):
        Trainer(config, model_fn=linear, dataset_fn=lambda: linear_data(10, 0), loss_fn=mse_loss, quiet=True).fit()


def test_with_an_autoscaler_the_driver_waits_bounded_then_says_why(ray_local, monkeypatch, tmp_path, capsys):
    import raytorch.group.placement

    marker = tmp_path / "ray_bootstrap_config.yaml"  # what the cluster launcher leaves on the head node
    marker.write_text("{}")
    monkeypatch.setattr(raytorch.group.placement, "AUTOSCALER_MARKER", marker)
    config = TrainConfig(workers=64, batch_size=64, resource_timeout=2)
    with pytest.raises(ClusterError, match=r"no room for 64 replicas of 1 CPU each after 2 s: the cluster has 1 node"):
        Trainer(config, model_fn=linear, dataset_fn=lambda: linear_data(100, 0), loss_fn=mse_loss, quiet=True).fit()
    out = capsys.readouterr().out
    assert "Waiting up to 2 s for room for 64 replicas of 1 CPU each (the autoscaler may add nodes)" in out


# --quiet in a driver that starts its own local Ray (nothing printed, Ray's token warning left out, it
# trains): test_reliability's killed driver runs with it.


class FakeTerminal(__import__("io").StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    from raytorch.output.console import Progress

    terminal = FakeTerminal()
    bar = Progress(stream=terminal, min_interval_s=0)
    bar.start(epoch=3, steps=10)
    bar.advance(steps=4, samples=400, loss_sum=100.0)
    bar.close()
    assert "epoch 3" in terminal.getvalue() and "4/10" in terminal.getvalue() and "loss=0.250000" in terminal.getvalue()
    pipe = __import__("io").StringIO()  # not a terminal: CI, `ray job` logs
    plain = Progress(stream=pipe)
    plain.start(epoch=0, steps=10)
    plain.advance(steps=10, samples=1000, loss_sum=100.0)
    plain.close()
    assert pipe.getvalue() == ""
