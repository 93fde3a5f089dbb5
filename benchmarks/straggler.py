"""The straggler case: two replicas, one sharing its core with a CPU-burning process.

Every replica process pins itself on its first training forward (a forward pre-hook on the model):
the first to claim the slot gets core 0 alone, the second core 1, which a busy-looping process of
this benchmark also holds, so that one runs at about half speed. The same for every system:
raytorch with an even split, raytorch with --split adaptive, Ray Train (DDP, even by design).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from functools import partial

import torch

from systems import ray_train
from workloads import WORKLOADS, Workload

FAST, SLOW = 0, 1  # cores


class Pin:
    """Forward pre-hook: on the first call, pin this process to core FAST if it claims the slot, else SLOW."""

    def __init__(self, folder: str):
        self.folder, self.done = folder, False

    def __call__(self, module, inputs):
        if not self.done:
            self.done = True
            try:
                os.close(os.open(os.path.join(self.folder, "fast"), os.O_CREAT | os.O_EXCL))
                os.sched_setaffinity(0, {FAST})
            except FileExistsError:
                os.sched_setaffinity(0, {SLOW})


def pinned_model(model_fn, folder: str) -> torch.nn.Module:
    model = model_fn()
    model.register_forward_pre_hook(Pin(folder))
    return model


def _burn() -> None:
    os.sched_setaffinity(0, {SLOW})
    os.nice(15)  # Ray runs its workers at nice 15: at the same niceness the two share the core about evenly
    while True:
        pass


def available() -> bool:
    return hasattr(os, "sched_setaffinity") and {FAST, SLOW} <= os.sched_getaffinity(0)


def run(system: str, workload: Workload, storage: str) -> dict:
    """One measured run of `system` with a straggler; seconds of the measured steps (and raytorch's model)."""
    folder = tempfile.mkdtemp(prefix="straggler-", dir=storage)
    burner = multiprocessing.get_context("spawn").Process(target=_burn, daemon=True)
    burner.start()
    try:
        if system == "ray train":
            return ray_train(workload, 2, storage, model_fn=partial(pinned_model, workload.model_fn, folder))
        from raytorch import TrainConfig, Trainer

        config = TrainConfig(workers=2, epochs=2, batch_size=workload.batch_size, lr=workload.lr, optimizer="sgd",
                             lr_schedule="constant", shuffle=False, reduction="shared_memory",
                             split="adaptive" if "adaptive" in system else "even")
        result = Trainer(config, model_fn=partial(pinned_model, workload.model_fn, folder), loss_fn=workload.loss_fn,
                         dataset_fn=lambda: workload.data_fn(workload.steps * workload.batch_size), quiet=True).fit()
        return {"seconds": result.epoch_times_s[1], "model": result.model}
    finally:
        burner.kill()
        burner.join()


def main(rounds: int) -> dict:
    """Alternating rounds of the three systems on the MLP; medians and ratios."""
    workload = WORKLOADS["mlp"]
    systems = ["raytorch even", "raytorch adaptive", "ray train"]
    seconds: dict[str, list[float]] = {s: [] for s in systems}
    models = {}
    with tempfile.TemporaryDirectory() as storage:
        for round_ in range(rounds):
            for system in systems:
                figures = run(system, workload, storage)
                seconds[system].append(figures["seconds"])
                models[system] = figures.get("model")
                print(f"straggler round {round_} {system:18s} {workload.steps / figures['seconds']:7.1f} steps/s",
                      flush=True)
    rates = {s: workload.steps / sorted(v)[len(v) // 2] for s, v in seconds.items()}
    diff = max(((a - b).norm() / b.norm()).item() for a, b in
               zip(models["raytorch adaptive"].parameters(), models["raytorch even"].parameters()))
    return {"workload": workload.name, "steps_per_s": rates, "seconds": seconds,
            "adaptive_vs_even": rates["raytorch adaptive"] / rates["raytorch even"],
            "adaptive_vs_ray_train": rates["raytorch adaptive"] / rates["ray train"],
            "adaptive_vs_even_max_rel_param_diff": diff}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=1))
