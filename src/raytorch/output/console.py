"""The console: its event lines (a Callback), warnings on stderr, and the live progress bar of an
epoch where the console is a terminal."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm

from .callbacks import Callback
from .lines import epoch_line


def warn(line: str) -> None:
    print(f"raytorch: warning: {line}", file=sys.stderr, flush=True)


class Console(Callback):
    """The console's event lines: an epoch's line (the seed note's), evaluations, early stops,
    skipped steps, replicas that joined or moved."""

    def __init__(self, say):
        self.say = say

    def on_epoch(self, record: dict) -> None:
        wb = (record["w"], record["b"]) if "w" in record else None
        self.say(epoch_line(record["epoch"], record["loss"], wb, record["eval_loss"], record["eval_accuracy"]))

    def on_eval(self, record: dict) -> None:
        accuracy = record["eval_accuracy"]
        self.say(f"step {record['step']}: eval loss={record['eval_loss']:.6f}"
                 + (f", accuracy={accuracy:.1%}" if accuracy is not None else ""))

    def on_record(self, record: dict) -> None:
        event = record["event"]
        if event == "early_stop":
            self.say(f"early stop at step {record['step']}: {record['metric']} has not improved on "
                     f"{record['best']:.6f} for {record['evaluations']} evaluations")
        elif event == "step_skipped":
            self.say(f"step {record['step']}: non-finite loss or gradient on {record['replicas']}; update skipped")
        elif event == "replica_joined":
            self.say(f"{record['replica']} joined (room appeared): {record['workers']} replicas from step "
                     f"{record['step']}, the same math")
        elif event == "replicas_moved":
            self.say(f"moved {', '.join(record['replicas'])} off a draining node before step {record['step']}: "
                     "nothing redone")
        super().on_record(record)


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
