"""StepPipeline: the driver's side of the steps. It plans each call (parts, weights, routes),
submits calls ahead of the losses it has gathered, and gathers them a few calls behind, so that
Ray's per-call latency overlaps with the replicas' compute instead of stalling every step.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from typing import Callable, NamedTuple, Optional

from ..config.schema import TrainConfig
from ..core.balance import SpeedEstimate
from ..core.callplan import Reduce, plan_steps, steps_per_call
from ..core.naming import replica_name
from ..core.position import Position
from ..core.reduce import weighted_mean
from ..core.runplan import RunPlan
from ..errors import NonFiniteError
from ..group.group import ReplicaGroup
from ..output.sink import RunOutput, StepsDone
from ..replica.replies import RunReport

# Calls the driver submits ahead of the losses it has gathered.
CALLS_IN_FLIGHT = 4


class Call(NamedTuple):
    """A call in flight: one Replica.run per replica, covering consecutive steps."""

    handoffs: list
    """Refs of each replica's last gradient, as its wire hands it over."""
    reports: list
    """Refs of each replica's RunReport."""
    first_step: int
    """The global step of the call's first step."""
    sizes: list[list[int]]
    """Each step's part sizes, by wire position."""


class StepPipeline:
    """Calls in flight, the all-reduce they carry over, the split and its speed measurements, and
    the timing of the current epoch."""

    def __init__(self, group: ReplicaGroup, config: TrainConfig, plan: RunPlan, output: RunOutput,
                 kept: Callable[[], str], stopping: Callable[[], bool] = lambda: False):
        """stopping(): true once the run is to stop (a signal): no call is started after it."""
        self.group, self.config, self.plan, self.output, self.kept = group, config, plan, output, kept
        self.stopping = stopping
        self.pending: deque[Call] = deque()  # oldest first
        self.applying: list = []  # refs of the apply calls that end a run of steps
        self.carry: Optional[Reduce] = None  # the last planned all-reduce, not applied yet
        self.carried: list = []  # the gradient refs it routes to (object-store wire)
        self.speeds = SpeedEstimate(group.size)
        self.shares: Optional[list[float]] = None  # the current split (None: even)
        self.last_split: dict[int, int] = {}  # the last full batch's part size by rank
        self.replica_samples: Counter[int] = Counter()  # samples computed, by rank
        self.step_time = 0.0  # seconds per step over the epoch so far
        self.epoch_clock = (time.perf_counter(), 0)  # when the epoch's steps (re)started, and at which index
        self.last_collect = self.epoch_clock[0]
        self.samples_since = 0
        self.waiters: list[Callable[[float], None]] = []  # called once the next step is done
        self.unplaced: set[str] = set()  # random calls not placed per sample, said already

    def start_epoch(self, at: Position) -> None:
        """The epoch's steps (re)start at `at`: its rate and step time are measured from here."""
        self.epoch_clock = (time.perf_counter(), at.index)
        self.last_collect, self.samples_since = self.epoch_clock[0], 0

    def after_next_step(self, waiter: Callable[[float], None]) -> None:
        """Wait for the next step's losses before going on, then call `waiter` with the time."""
        self.waiters.append(waiter)

    def membership_changed(self) -> None:
        """Replicas were replaced or dropped: positions changed, measure their speeds afresh."""
        self.speeds, self.shares = SpeedEstimate(self.group.size), None

    def run(self, at: Position, batches: list, end: int) -> None:
        """Run steps at.index .. end - 1 of the epoch whose global batches are `batches` (fewer where
        the run is stopping). On return every replica has applied them all, and their losses are in
        `at` (at.index is past them)."""
        first, done, wire = self.plan.first_step(at.epoch), at.index, self.group.wire
        while done < end and not self.stopping():
            chunk = batches[done:min(end, done + steps_per_call(wire, self.step_time))]
            # split each batch: contiguous parts, part r to replica r (near-equal, or sized so all
            # replicas finish together with --split adaptive), and plan the all-reduce of each
            # step: weights n_r / n and a route to every replica's gradient
            # every replica computes every step where they synchronize within it (BatchNorm, FSDP2): even
            if self.config.split == "adaptive" and not (self.config.sync_batchnorm or self.config.shard == "full"):
                self.shares = self.speeds.shares(len(chunk[0]), self.shares)
            plans, sizes, carry = plan_steps(chunk, self.group.size, self.carry, wire, first + done, self.shares)
            # replicas follow their plans: apply the previous all-reduce, compute their gradient (the
            # dashboard's task list names each call)
            name = f"epoch {at.epoch} steps {first + done}-{first + done + len(chunk) - 1}"
            handoffs, reports = self.group.run(plans, self.carried, name)
            # all-reduce through the driver: the next call gets the last step's gradients (by
            # reference on the object-store wire; by (rank, step) from shared memory otherwise)
            self.carry = carry
            self.carried = [handoffs[r] for r, n in enumerate(sizes[-1]) if n] if wire == "object_store" else []
            self.pending.append(Call(handoffs, reports, first + done, sizes))
            # gather losses a few calls behind, so the driver never stalls the replicas
            if self.waiters:
                self._collect(at)
                now = time.perf_counter()
                for waiter in self.waiters:
                    waiter(now)
                self.waiters.clear()
            while len(self.pending) > CALLS_IN_FLIGHT:
                self._collect(at)
            done += len(chunk)
        # step: every replica applies the last all-reduce
        self.applying = self.group.apply(self.carry, self.carried) if self.carry is not None else []
        self.carry, self.carried = None, []
        while self.pending:
            self._collect(at)
        self.group.get(self.applying)
        self.applying = []

    def _collect(self, at: Position) -> None:
        """Turn the oldest call's per-replica losses into per-step sample-weighted losses."""
        call = self.pending[0]
        try:
            reports = self.group.get(call.reports)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e} (epoch {at.epoch}); {self.kept()}", rank=e.rank, step=e.step) from e
        self.pending.popleft()  # only now: a call that failed stays listed, for drain
        self._say_unplaced(reports)
        ranks, before, now = self.group.ranks, len(at.losses), time.perf_counter()
        for offset, sizes in enumerate(call.sizes):
            active = [r for r, n in enumerate(sizes) if n]
            parts = [reports[r].losses[offset] for r in active]
            for r in active:  # its own time on its part (compute, and the rest): how fast each replica is
                self.speeds.observe(r, sizes[r], *reports[r].seconds[offset])
                self.replica_samples[ranks[r]] += sizes[r]
            at.add(weighted_mean(parts, [sizes[r] for r in active]), sum(sizes))
            if not math.isfinite(at.losses[-1]):  # on_nonfinite 'skip': every replica skipped its update
                at.skipped.append(call.first_step + offset)
                self.output.step_skipped(call.first_step + offset,
                                         [ranks[r] for r, p in zip(active, parts) if not math.isfinite(p)])
        at.index = before + len(call.sizes)
        started, index = self.epoch_clock
        self.samples_since += sum(at.counts[before:])
        self.output.steps_done(StepsDone(
            epoch=at.epoch, first_step=call.first_step, losses=at.losses[before:], sizes=call.sizes, ranks=ranks,
            samples_per_s=self.samples_since / max(now - started, 1e-9),
            seconds_per_step=(now - self.last_collect) / len(call.sizes), running_loss=at.running_loss()), at)
        self.last_collect = now
        # a short last batch is cut by speed too, but its small parts say little about the speeds
        full = [sizes for sizes in call.sizes if sum(sizes) == self.plan.step_batch]
        self.last_split = dict(zip(ranks, full[-1])) if full else self.last_split
        self.step_time = (now - started) / max(1, len(at.losses) - index)

    def _say_unplaced(self, reports: list[RunReport]) -> None:
        """Random draws of the forward raytorch does not place per sample, said once each."""
        news = sorted({name for report in reports for name in report.unplaced} - self.unplaced)
        if news:
            self.unplaced.update(news)
            self.output.say(f"the model's forward draws {', '.join(news)} from torch's generator: those draws are "
                            "not placed per sample, so they depend on the number of replicas and the split "
                            "(dropout is placed: the contract holds for it)")

    def uneven_split(self) -> Optional[tuple[str, str, float]]:
        """The last step's split where it is far from even: the replica with the smallest part, the
        one with the largest, and how many times slower per sample the first measured."""
        if self.config.split != "adaptive":
            return None
        ranks = self.group.ranks
        found = self.speeds.uneven([self.last_split.get(rank, 0) for rank in ranks])
        return None if found is None else (replica_name(ranks[found[0]]), replica_name(ranks[found[1]]), found[2])

    def drain(self, timeout: Optional[float] = None) -> None:
        """Give up the calls in flight (a replica was lost: they fail at once, or finish), taking
        their errors; the next run starts with no all-reduce carried over."""
        refs = [ref for call in self.pending for ref in (*call.reports, *call.handoffs)] + self.applying
        self.pending.clear()
        self.applying, self.carry, self.carried = [], None, []
        self.group.drain(refs, timeout)
