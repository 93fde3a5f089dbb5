#!/usr/bin/env python3
"""How long raytorch takes to get over a lost replica, per fault, on this machine.

    python scripts/recovery.py                       # linear and MLP workloads, every fault
    python scripts/recovery.py --workloads 25m --json recovery.json

Each run holds its two replicas at a gate mid-run (tests/faults.py), injects the fault into
replica-1's process (found through Ray's state API), opens the gate, and reads back from the
run's restart record: fault to detection, detection to the first step after recovery, and
whether the run still ended with one set of parameters. Adam, so the optimizer state is copied too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks"), str(ROOT / "src")]

FAULTS = {  # name: (reduction, how to hurt the process, step_timeout, spares)
    "SIGKILL, shared-memory wire": ("shared_memory", "sigkill", 300.0, 0),
    "SIGKILL, object-store wire": ("object_store", "sigkill", 300.0, 0),
    "ray.kill": ("shared_memory", "ray_kill", 300.0, 0),
    "SIGSTOP (hang), step_timeout 5 s": ("shared_memory", "sigstop", 5.0, 0),
    "SIGKILL, shared-memory wire, 1 spare": ("shared_memory", "sigkill", 300.0, 1),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="linear,mlp")
    parser.add_argument("--json", default="recovery.json")
    args = parser.parse_args()
    from raytorch.group.cluster import keep_on_loopback

    keep_on_loopback()
    import ray

    ray.init(num_cpus=4, include_dashboard=True, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path[:3])}})
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    os.environ["RAY_AUTH_MODE"] = "token"  # the state API reads the token
    rows = []
    for workload in args.workloads.split(","):
        for fault, (reduction, how, step_timeout, spares) in FAULTS.items():
            row = measure(workload, reduction, how, step_timeout, spares)
            rows.append({"workload": workload, "fault": fault, **row})
            print(f"{workload:7s} {fault:34s} detected {row['detect_s']:6.2f} s, recovered {row['recovery_s']:6.2f} s "
                  f"after, at step {row['step']}, replicas equal: {row['equal']}", flush=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))
    ray.shutdown()
    return 0


def measure(workload_name: str, reduction: str, how: str, step_timeout: float, spares: int) -> dict:
    import ray
    from ray.util.state import list_actors

    from faults import gated
    from raytorch import TrainConfig, Trainer
    from workloads import WORKLOADS

    workload = WORKLOADS[workload_name]
    gate = Path(tempfile.mkdtemp(prefix="raytorch-gate-"))
    (gate / "hold").touch()
    injected = {}

    def inject():
        while len(pids := {int(p.name.split("-")[1]) for p in gate.glob("reached-*")}) < 2:
            time.sleep(0.01)
        [actor] = [a for a in list_actors(filters=[("name", "=", "replica-1"), ("state", "=", "ALIVE")])
                   if a.pid in pids]
        while spares and not list_actors(filters=[("ray_namespace", "=", actor.ray_namespace),
                                                  ("name", "=", "spare-2"), ("state", "=", "ALIVE")]):
            time.sleep(0.05)  # the spare is still being built
        injected["at"] = time.time()
        if how == "ray_kill":
            ray.kill(ray.get_actor(actor.name, namespace=actor.ray_namespace))
        else:
            os.kill(actor.pid, signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
        (gate / "hold").unlink()

    steps = 40
    config = TrainConfig(workers=2, epochs=1, batch_size=workload.batch_size, lr=workload.lr, optimizer="adam",
                         reduction=reduction, step_timeout=step_timeout, spares=spares)
    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    result = Trainer(config, model_fn=partial(gated, workload.model_fn, str(gate), steps // 2),
                     dataset_fn=partial(workload.data_fn, steps * workload.batch_size), loss_fn=workload.loss_fn,
                     quiet=True).fit()
    injector.join()
    [restart] = result.restarts
    return {"detect_s": restart["detected_at"] - injected["at"], "recovery_s": restart["recovery_s"],
            "step": restart["step"], "equal": len(set(result.replica_digests)) == 1, "restart": restart}


if __name__ == "__main__":
    sys.exit(main())
