#!/usr/bin/env python3
"""raytorch's W = 2 steps/s on two checkouts side by side, to tell a change from noise:

    python benchmarks/trees.py /tmp/before . --rounds 5
    python benchmarks/trees.py /tmp/before . --workloads linear --wires shared_memory

Each tree runs with its own virtual environment (`<tree>/.venv`, with raytorch installed from that
tree: `python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e .`) and its own sources,
every run in a process of its own (its own local Ray on 127.0.0.1), the trees alternating within
each round (the order flipped every other round) so that drift hits both alike. The figure is
benchmarks/systems.py's raytorch run of a benchmarks/workloads.py workload; the table shows
medians and every round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

RUN = r'''
import json, logging, os, sys
sys.path[:0] = ["{tree}/benchmarks", "{tree}/src"]
try:
    from raytorch.group.cluster import keep_on_loopback
except ImportError:  # a tree from before the layer folders
    from raytorch.cluster import keep_on_loopback
keep_on_loopback()
import ray
ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
         runtime_env={{"env_vars": {{"PYTHONPATH": os.pathsep.join(sys.path[:2])}}}})
assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
import systems
from workloads import WORKLOADS
w = WORKLOADS["{workload}"]
out = systems.raytorch(w, 2, "{wire}")
print("RESULT", json.dumps(w.steps / out["seconds"]))
'''


def steps_per_s(tree: Path, workload: str, wire: str) -> float | None:
    """One run's steps/s, or None (its error printed) where it failed."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    done = subprocess.run([str(tree / ".venv/bin/python"), "-c", RUN.format(tree=tree, workload=workload, wire=wire)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(done.stderr[-2000:])
        return None
    return json.loads(lines[0].split(" ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="linear,mlp")
    parser.add_argument("--wires", default="shared_memory,object_store")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    figures: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for workload in args.workloads.split(","):
            for wire in args.wires.split(","):
                for name in (("before", "after") if round_ % 2 == 0 else ("after", "before")):
                    value = steps_per_s(trees[name], workload, wire)
                    print(round_, workload, wire, name, value, flush=True)
                    if value is not None:
                        figures.setdefault(f"{workload} {wire} {name}", []).append(value)
    for key, values in sorted(figures.items()):
        print(f"{key:36} median {statistics.median(values):8.1f}  {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    main()
