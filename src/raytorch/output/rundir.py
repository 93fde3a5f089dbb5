"""The run directory: the resolved config, metrics.jsonl, TensorBoard scalars and loss.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

from ..config.schema import TrainConfig
from .callbacks import Callback


class RunDir(Callback):
    """The run directory: the resolved config (config.yaml); metrics.jsonl, one JSON object per
    line, its "event" saying what ('step' every log_every steps and the first, 'epoch', 'eval',
    'checkpoint', 'replica_lost', 'step_skipped', ...: callbacks.py); the same steps and epochs as
    TensorBoard scalars (optional); loss.png at the end. A write that fails stops the run (essential)."""

    essential = True

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
