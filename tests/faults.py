"""Models for fault tests, importable by replicas (tests/ is on their PYTHONPATH)."""

import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch


class Gate:
    """A forward pre-hook: the module's training forwards, from the `at`-th on in each process,
    write `<folder>/reached-<pid>` and then wait while `<folder>/hold` exists; with `only`, only
    the replica of that name (its Ray actor's) waits, and the others go on.

    The test holds the run at a known step, injects its fault into a process it found through
    Ray's state API, and removes `hold`: the fault always lands mid-run. A replacement replica
    is a new process, so it meets the gate only after its own `at` forwards (and has a name of
    its own). Holding only the victim leaves its peers waiting for it on the wire, not computing:
    however long the test takes to inject, they are never counted hung.
    """

    def __init__(self, folder: str, at: int, only: Optional[str] = None):
        self.folder, self.at, self.only, self.calls = Path(folder), at, only, 0

    def __call__(self, module, inputs):
        if module.training:
            self.calls += 1
            if self.calls == self.at:
                (self.folder / f"reached-{os.getpid()}").touch()
            while self.calls >= self.at and self.holds() and (self.folder / "hold").exists():
                time.sleep(0.005)  # a replica held on purpose: no event reaches it but the file

    def holds(self) -> bool:
        if self.only is None:
            return True
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_name() == self.only


def gated(model_fn, folder: str, at: int, only: Optional[str] = None) -> torch.nn.Module:
    """model_fn() with a Gate on its forward."""
    model = model_fn()
    model.register_forward_pre_hook(Gate(folder, at, only))
    return model


def Gated(folder: str, at: int, only: Optional[str] = None) -> torch.nn.Module:  # noqa: N802  (reads as the model)
    """A gated 1 -> 1 linear model."""
    return gated(partial(torch.nn.Linear, 1, 1), folder, at, only)


class Poisoned(torch.nn.Linear):
    """A 1 -> 1 linear model whose output is NaN for any batch holding the sample x == -7."""

    def __init__(self):
        super().__init__(1, 1)

    def forward(self, x):
        out = super().forward(x)
        return out * torch.where(x == -7, torch.nan, 1.0)


class Straggle:
    """A forward pre-hook for training forwards: every process sleeps `base` seconds per sample of
    the batch; the first process to reach a training forward claims `<folder>/slow` and, from its
    `after`-th training forward on, sleeps `per_sample` more: a straggler (from the start, or a
    replica that slows down mid-run, as beside a noisy neighbour)."""

    def __init__(self, folder: str, per_sample: float, after: int = 0, base: float = 0.0):
        self.folder, self.per_sample, self.after, self.base = Path(folder), per_sample, after, base
        self.slow, self.calls = None, 0

    def __call__(self, module, inputs):
        if not module.training:
            return
        if self.slow is None:
            try:
                os.close(os.open(self.folder / "slow", os.O_CREAT | os.O_EXCL))
                self.slow = True
            except FileExistsError:
                self.slow = False
        self.calls += 1
        straggling = self.slow and self.calls > self.after
        time.sleep((self.base + (self.per_sample if straggling else 0.0)) * len(inputs[0]))


def straggling(model_fn, folder: str, per_sample: float, after: int = 0, base: float = 0.0) -> torch.nn.Module:
    """model_fn() with a Straggle on its forward."""
    model = model_fn()
    model.register_forward_pre_hook(Straggle(folder, per_sample, after, base))
    return model


class Paced:
    """A forward pre-hook for training forwards: `base` seconds per sample of the batch while
    `<folder>/on` exists. A run paced while a test acts on it, then let go at full speed."""

    def __init__(self, folder: str, base: float):
        self.on, self.base = Path(folder) / "on", base

    def __call__(self, module, inputs):
        if module.training and self.on.exists():
            time.sleep(self.base * len(inputs[0]))


def paced(model_fn, folder: str, base: float) -> torch.nn.Module:
    """model_fn() with a Paced on its forward."""
    model = model_fn()
    model.register_forward_pre_hook(Paced(folder, base))
    return model


def in_replica() -> bool:
    """True inside a Ray actor (a replica), false in the driver (which builds the model too)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def die_once(folder: str, phase: str) -> None:
    """SIGKILL this replica's process if it is the first to reach `phase` (it claims
    `<folder>/<phase>.claimed` by an exclusive create): one loss per phase and run, whichever
    replica gets there first; its replacement finds the claim taken and lives."""
    if not in_replica():
        return
    try:
        os.close(os.open(Path(folder) / f"{phase}.claimed", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


class PhaseFault(torch.nn.Linear):
    """A 1 -> 1 linear model whose replica dies once at `phase`: 'start' (building the model in a
    replica), 'first_step' (its first training forward), 'evaluation' (an eval forward), 'finish'
    (its state read after the last step: the run's closing digests)."""

    def __init__(self, folder: str, phase: str):
        super().__init__(1, 1)
        self.folder, self.phase, self.forwards = folder, phase, 0
        if phase == "start":
            die_once(folder, phase)
        if phase == "finish":  # a buffer: not the seed's scalar model, whose state is read every epoch
            self.register_buffer("marker", torch.zeros(1))

    def state_dict(self, *args, **kwargs):
        if self.phase == "finish":
            die_once(self.folder, self.phase)
        return super().state_dict(*args, **kwargs)

    def forward(self, x):
        if self.training:
            self.forwards += 1
            if self.phase == "first_step" and self.forwards == 1:
                die_once(self.folder, self.phase)
        elif self.phase == "evaluation":
            die_once(self.folder, self.phase)
        return super().forward(x)


class PhaseFaultSGD(torch.optim.SGD):
    """SGD whose replica dies once at `phase`: 'checkpoint' (its state taken: a checkpoint or a
    recovery's copy), 'restore' (its state loaded: a recovery or a resume)."""

    def __init__(self, params, folder: str, phase: str, lr: float):
        super().__init__(params, lr=lr)
        self.folder, self.phase = folder, phase

    def state_dict(self):
        if self.phase == "checkpoint":
            die_once(self.folder, self.phase)
        return super().state_dict()

    def load_state_dict(self, state_dict):
        if self.phase == "restore":
            die_once(self.folder, self.phase)
        return super().load_state_dict(state_dict)


def phase_fault_sgd(folder: str, phase: str, lr: float, model: torch.nn.Module) -> torch.optim.Optimizer:
    """optimizer_fn for PhaseFaultSGD."""
    return PhaseFaultSGD(model.parameters(), folder, phase, lr)
