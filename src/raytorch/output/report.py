"""What a run tells its user: the seed note's console lines and the run directory's files."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, TextIO

import torch
import yaml
from tqdm import tqdm

from ..config.schema import TrainConfig
from .callbacks import Callback


def replica_name(rank: int) -> str:
    """What the console, the dashboard (actor names), metrics and records call replica `rank`."""
    return f"replica-{rank}"


def is_scalar_linear(state: Mapping[str, torch.Tensor]) -> bool:
    """True for a 1 -> 1 linear model: one weight and one bias of one element each."""
    return (len(state) == 2 and all(t.numel() == 1 for t in state.values())
            and sorted(k.rsplit(".", 1)[-1] for k in state) == ["bias", "weight"])


def scalar_linear_values(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The linear model's {"w": weight, "b": bias} (see is_scalar_linear)."""
    values = {k.rsplit(".", 1)[-1]: t.item() for k, t in state.items()}
    return {"w": values["weight"], "b": values["bias"]}


def epoch_line(epoch: int, loss: float, wb: Optional[tuple[float, float]] = None,
               eval_loss: Optional[float] = None, accuracy: Optional[float] = None) -> str:
    """'Epoch 0: loss=5.941978 (w=2.011, b=0.402)' for the linear model (`wb`: its w and b), the
    eval loss (and a classifier's eval accuracy) for others."""
    line = f"Epoch {epoch}: loss={loss:.6f}"
    if wb is not None:
        return f"{line} (w={wb[0]:.3f}, b={wb[1]:.3f})"
    if eval_loss is not None:
        right = f", accuracy={accuracy:.1%}" if accuracy is not None else ""
        return f"{line} (eval loss={eval_loss:.6f}{right})"
    return line


def final_line(eval_loss: float) -> str:
    return f"Final loss is: {eval_loss:.6f}"


def summary_line(loss: float, eval_loss: Optional[float], steps: int, samples: int, wall_s: float,
                 workers: int) -> str:
    """The run's last line: what it reached and what it cost."""
    evaluated = f", eval loss {eval_loss:.6f}" if eval_loss is not None else ""
    return (f"Done: {steps} steps on {workers} replicas in {wall_s:.1f} s ({samples / wall_s:,.0f} samples/s); "
            f"last epoch loss {loss:.6f}{evaluated}")


def uneven_line(small: str, large: str, slower: float) -> str:
    """Why an adaptive split is far from even, in one line."""
    return (f"split far from even: {small} measured {slower:.1f}x the time per sample of {large}, so it takes fewer "
            f"samples and neither waits for the other (a replica that shares its core with the driver or other "
            f"work measures slower; --split even cuts evenly)")


def stuck_in(dump: Optional[str]) -> str:
    """'; stuck in wait (torch/distributed/...:123)': the innermost frame of the thread that runs
    the replica's calls, read from a py-spy dump; '' without one."""
    if not dump:
        return ""
    threads = [block.splitlines() for block in re.split(r"\n(?=Thread )", dump) if block.startswith("Thread ")]
    frames = [[line.strip() for line in thread[1:] if line.startswith(" ")] for thread in threads]
    calls = [stack for stack in frames if any("replica.py" in frame for frame in stack)] or [f for f in frames if f]
    return f"; stuck in {calls[0][0]}" if calls else ""


def restarts_line(restarts: list[dict]) -> str:
    """'restarts: 1 (replica-1, step 412, ActorDiedError)'."""
    described = "; ".join(f"{', '.join(r['replicas'])}, "
                          + (f"step {r['step']}" if r["step"] is not None else f"while {r['phase']}")
                          + f", {r['cause']}"
                          + (f", continued without {', '.join(r['dropped'])}" if r["dropped"] else "")
                          for r in restarts)
    return f"restarts: {len(restarts)} ({described})"


class Progress:
    """A live bar per epoch (steps, running loss, samples/s, ETA) where the console is a terminal;
    nothing where it is not (CI, `ray job` logs keep the plain per-epoch lines)."""

    def __init__(self, stream: TextIO = sys.stdout, enabled: bool = True, min_interval_s: float = 0.1):
        self.stream, self.min_interval_s = stream, min_interval_s
        self.enabled = enabled and stream.isatty()
        self.bar: Optional[tqdm] = None

    def start(self, epoch: int, steps: int, done: int = 0) -> None:
        """A bar for an epoch of `steps` steps, `done` of them already run (a resumed epoch)."""
        if self.enabled:
            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}", unit="step", leave=False,
                            file=self.stream, dynamic_ncols=True, mininterval=self.min_interval_s)
            self.started, self.samples, self.loss_sum = time.perf_counter(), 0, 0.0

    def advance(self, steps: int, samples: int, loss_sum: float) -> None:
        """`steps` more done, holding `samples` samples whose losses add up to `loss_sum`."""
        if self.bar is not None:
            self.samples += samples
            self.loss_sum += loss_sum
            rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
            running = self.loss_sum / self.samples  # the epoch's sample-weighted mean so far
            self.bar.set_postfix_str(f"loss={running:.6f}, {rate:,.0f} samples/s", refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunDir(Callback):
    """The run directory: the resolved config (config.yaml); metrics.jsonl, one JSON object per
    line, its "event" saying what ('step' every log_every steps and the first, 'epoch', 'eval',
    'checkpoint', 'replica_lost', 'step_skipped', ...: callbacks.py); the same steps and epochs as
    TensorBoard scalars (optional); loss.png at the end."""

    def __init__(self, path: str | Path, tensorboard: bool = False, log_every: int = 0):
        self.path = Path(path)
        self.log_every = log_every
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics = self.path / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(self.path / "tensorboard"))

    def write_config(self, config: TrainConfig) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    def on_steps(self, records: list[dict]) -> None:
        """Every log_every-th step, and the first: where the curve starts."""
        every = self.log_every
        for record in records:
            if every and (record["step"] % every == 0 or record["step"] == 1):
                self.on_record(record)

    def on_record(self, record: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            if record["event"] == "step":
                self.writer.add_scalar("train/loss", record["loss"], record["step"])
                self.writer.add_scalar("train/samples_per_s", record["samples_per_s"], record["step"])
            elif record["event"] == "epoch":
                self.writer.add_scalar("train/epoch_loss", record["loss"], record["steps"])
                if record["eval_loss"] is not None:
                    self.writer.add_scalar("eval/loss", record["eval_loss"], record["steps"])

    def records(self, event: str) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [r for r in map(json.loads, self.metrics.read_text().splitlines()) if r["event"] == event]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def plot(self) -> Optional[Path]:
        """Draw loss.png: train loss per logged step, epoch means and eval loss against the step.
        Returns its path, or None without matplotlib (the optional extra 'plot')."""
        try:
            import matplotlib

            matplotlib.use("Agg")  # files only, no display
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps, epochs = self.records("step"), self.records("epoch")
        figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
        if steps:
            axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6,
                      label="train loss (step)")
        axes.plot([r["steps"] for r in epochs], [r["loss"] for r in epochs], "o-", label="train loss (epoch mean)")
        evals = [r for r in epochs if r["eval_loss"] is not None]
        if evals:
            axes.plot([r["steps"] for r in evals], [r["eval_loss"] for r in evals], "s-", label="eval loss")
        positive = [v for r in steps + epochs for v in (r["loss"], r.get("eval_loss")) if v is not None and v > 0]
        if positive and max(positive) / min(positive) > 100:
            axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(f"{self.path.name}")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = self.path / "loss.png"
        figure.savefig(path)
        plt.close(figure)
        return path
