"""Faults at random moments (scripts/bench.py --faults): runs of one small job, each with one
replica SIGKILLed (its process gone, as the OOM killer does) or SIGSTOPped (a hang: the process
exists and answers nothing) at a random moment between the run's start and its end.

Every run is compared with the same job run undisturbed (which the contract tests compare with
plain PyTorch): the parameters' largest relative difference and the epoch losses. Each run
reports what the driver recorded of the loss (phase, step, cause, recovery time: from detection to
the first step done after it), the steps whose gradients were computed again, and its wall time
against the undisturbed run's. Most faults land while the replicas train, every fifth while they
start.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from functools import partial

import torch
import torch.nn.functional as F

from raytorch import TrainConfig, Trainer
from raytorch.tasks.builtin import linear_data

JOB = dict(workers=2, epochs=4, batch_size=16, lr=1e-4, optimizer="sgd", seed=3, step_timeout=2.0)  # 120 steps
DATA = partial(linear_data, 480, 3)
PACE_S = 0.05  # a training forward's sleep: the run lasts a few seconds, a fault lands mid-run


class Paced(torch.nn.Linear):
    """y = w x + b, slowed to PACE_S a training forward."""

    def __init__(self):
        super().__init__(1, 1)

    def forward(self, x):
        if self.training:
            time.sleep(PACE_S)
        return super().forward(x)


def fit(config: TrainConfig):
    return Trainer(config, model_fn=Paced, dataset_fn=DATA, loss_fn=F.mse_loss, quiet=True).fit()


def replica_pids() -> list[tuple[str, int]]:
    """The live replicas (and spares) of the run in progress, (title, pid): processes this one
    started (through the local Ray it holds) whose title Ray set to ray::Replica."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::Replica") and process.status() != psutil.STATUS_STOPPED:
            found.append((title.split()[0], process.pid))
    return found


def fault(kind: str, delay_s: float, rng: random.Random, hit: list) -> None:
    """After `delay_s`, send `kind` (SIGKILL or SIGSTOP) to a random live replica of the run."""
    time.sleep(delay_s)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        try:
            live = replica_pids()
        except Exception:  # noqa: BLE001  (the state API answers once the actors exist)
            live = []
        if live:
            name, pid = rng.choice(live)
            os.kill(pid, getattr(signal, kind))
            hit.append((name, time.time()))
            return
        time.sleep(0.05)


def max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(((p - q).norm() / q.norm().clamp_min(1e-12)).item() for p, q in zip(a.parameters(), b.parameters()))


def main(runs: int, seed: int) -> dict:
    rng = random.Random(seed)
    config = TrainConfig(**JOB)
    clean = fit(config)
    print(f"undisturbed: {clean.time_to_first_step_s:.1f} s to the first step, then {clean.wall_time_s:.1f} s for "
          f"{clean.steps} steps", flush=True)
    records = []
    for k in range(runs):
        # every fifth run: a SIGKILL while the replicas start (a SIGSTOP there is found only after
        # START_TIMEOUT_S: see docs/reliability.md); the others while they train
        kind = "SIGKILL" if k % 5 == 4 or k % 3 != 2 else "SIGSTOP"
        start = clean.time_to_first_step_s
        delay = rng.uniform(0.0, start) if k % 5 == 4 else start + rng.uniform(0.0, clean.wall_time_s)
        hit: list = []
        killer = threading.Thread(target=fault, args=(kind, delay, rng, hit), daemon=True)
        started = time.perf_counter()
        killer.start()
        try:
            result, error = fit(config), None
        except Exception as e:  # noqa: BLE001  (reported: a run that did not survive its fault)
            result, error = None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
        wall = time.perf_counter() - started
        killer.join()
        record = {"fault": kind, "after_s": round(delay, 2), "hit": hit[0][0] if hit else None,
                  "wall_s": round(wall, 2), "error": error}
        if result is not None and result.restarts and hit:  # from the signal to the driver's finding
            record["detect_s"] = round(result.restarts[0]["detected_at"] - hit[0][1], 3)
        if result is not None:
            record.update(
                restarts=[{key: r.get(key) for key in ("phase", "step", "cause", "recovery_s", "replaced", "dropped")}
                          for r in result.restarts],
                steps_redone=result.steps_redone, max_rel_param_diff=max_rel_diff(result.model, clean.model),
                losses_equal=all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(result.epoch_losses, clean.epoch_losses)))
        records.append(record)
        print(f"run {k}: {record}", flush=True)
    survived = [r for r in records if r["error"] is None]
    recovery = [x["recovery_s"] for r in survived for x in r["restarts"] if x.get("recovery_s") is not None]
    return {"job": JOB, "undisturbed_wall_s": clean.wall_time_s, "undisturbed_first_step_s": clean.time_to_first_step_s,
            "runs": records,
            "survived": len(survived), "faulted": sum(bool(r["restarts"]) for r in survived),
            "max_rel_param_diff": max((r["max_rel_param_diff"] for r in survived), default=None),
            "recovery_s_median": statistics.median(recovery) if recovery else None,
            "recovery_s_max": max(recovery) if recovery else None}
