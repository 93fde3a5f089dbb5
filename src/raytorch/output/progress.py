"""A run's progress where the Ray dashboard shows it however the driver runs: the first replica's
actor log gets a line at each epoch's end and at most one every EVERY_S seconds in between (epoch,
step, loss, samples/s, ETA). The Jobs page shows a driver's own log only for a submitted job; the
Actors page shows every actor's log, so a plain `python scripts/train.py` run is readable there too.

Ray forwards every replica's output to the driver's console, where the driver already says the
same: lines carrying MARK are left out of this driver's console (quiet_marked_lines).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from ..compat import rayprivate
from .callbacks import Callback

MARK = "[raytorch progress]"
EVERY_S = 10.0


def progress_line(epoch: int, step: int, total: int, loss: Optional[float], samples_per_s: float,
                  elapsed_s: float, epoch_end: bool = False) -> str:
    """'[raytorch progress] epoch 2, step 120/300 (40%), loss 0.0421, 1,830 samples/s, ETA 1m12s'."""
    eta = elapsed_s * (total - step) / step if step else None
    figures = [f"epoch {epoch}" + (" done" if epoch_end else ""), f"step {step}/{total} ({step / max(total, 1):.0%})",
               f"loss {loss:.6g}" if loss is not None else "loss -", f"{samples_per_s:,.0f} samples/s",
               f"ETA {clock(eta)}" if eta is not None else "ETA -"]
    return f"{MARK} " + ", ".join(figures)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}h" if hours else "") + (f"{rest // 60}m" if hours or rest >= 60 else "") + f"{rest % 60}s"


class ProgressLog(Callback):
    """Sends progress lines to `send` (the first replica's log): each epoch's end, and a step at
    most every `every_s` seconds."""

    def __init__(self, send: Callable[[str], None], total_steps: int, every_s: float = EVERY_S,
                 clock_fn: Callable[[], float] = time.monotonic):
        self.send, self.total, self.every_s, self.now = send, total_steps, every_s, clock_fn
        self.started = self.last = clock_fn()

    def on_steps(self, records: list[dict]) -> None:
        if self.now() - self.last < self.every_s:
            return
        r = records[-1]
        self.line(r["epoch"], r["step"], r["running_loss"], r["samples_per_s"])

    def on_epoch(self, record: dict) -> None:
        self.line(record["epoch"], record["steps"], record["loss"], record["samples_per_s"], epoch_end=True)

    def line(self, epoch: int, step: int, loss: Optional[float], samples_per_s: float, epoch_end: bool = False):
        self.last = self.now()
        self.send(progress_line(epoch, step, self.total, loss, samples_per_s, self.last - self.started, epoch_end))


def quiet_marked_lines() -> None:
    """Leave MARK lines out of what Ray's log forwarding prints in this driver's console (once per
    process; the rest is printed as Ray prints it). Ray's own printer is wrapped: where it is not
    found (another Ray), nothing changes but that the lines show twice."""
    rayprivate.wrap_log_printer(without_marked)


def without_marked(handler: Callable[[dict], None]) -> Callable[[dict], None]:
    def printing(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if MARK not in line]
        if lines:
            handler({**data, "lines": lines})

    printing.raytorch_quiet = True
    return printing
