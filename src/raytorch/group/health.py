"""A replica's health as the group judges it: alive, dead, or hung (no answer to a ping, or one
step computing past step_timeout); a hung one is ended, its Python stacks kept first as evidence."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import Optional, Sequence

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..core.naming import replica_name, stuck_in
from ..errors import ReplicaLost
from ..replica.replies import ReplicaInfo
from .records import Member

PY_SPY_S = 15.0  # a hung replica's stack, taken before it is killed: at most this long
PING_TIMEOUT_S = 10.0  # a replica's health thread answers at once unless its process is stopped


def health(actors: Sequence, step_timeout: float) -> tuple[list[tuple[int, str]], list[int]]:
    """One ping to every replica: (positions of those hung, with the reason; positions of the dead).
    Hung: no answer to the ping, or one step computing for longer than step_timeout."""
    pings = [a.ping.remote() for a in actors]
    wait = min(PING_TIMEOUT_S, step_timeout)
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=wait)
    hung, gone = [], []
    for position, ping in enumerate(pings):
        if ping not in ready:
            hung.append((position, f"no answer to a ping within {wait:g} s"))
            continue
        try:
            computing = ray.get(ping).computing_s
        except RayActorError:
            gone.append(position)
            continue
        if computing is not None and computing > step_timeout:
            hung.append((position, f"one step computing for {computing:.0f} s"))
    return hung, gone


class Hangs:
    """Finds hung replicas among the group's and ends them, keeping each one's Python stacks
    (py-spy) by name until recovery takes them for its event record."""

    def __init__(self, step_timeout: float):
        self.step_timeout = step_timeout
        self.stacks: dict[str, Optional[str]] = {}

    def find(self, members: Sequence[Member]) -> tuple[list[tuple[int, str]], list[int]]:
        """(positions of the hung, with why; positions of the dead) among `members`."""
        return health([m.actor for m in members], self.step_timeout)

    def end(self, members: Sequence[Member], hung: Sequence[tuple[int, str]]) -> None:
        """End the hung replicas (positions, with why), their Python stacks kept first."""
        for position, _ in hung:
            self.stacks[replica_name(members[position].rank)] = end_hung(members, position)

    def lost(self, members: Sequence[Member]) -> Optional[ReplicaLost]:
        """Where some of `members` are hung: end them (find, end) and the ReplicaLost naming them,
        with where each was stuck; None where none is (slow, not hung)."""
        hung, _ = self.find(members)
        if not hung:
            return None
        self.end(members, hung)
        names = ", ".join(f"{name} ({why}{stuck_in(self.stacks.get(name))})"
                          for name, why in ((replica_name(members[p].rank), why) for p, why in hung))
        return ReplicaLost(f"{names}: treated as dead after step_timeout {self.step_timeout:g} s")

    def take(self) -> dict[str, Optional[str]]:
        """The stacks kept since the last take, by replica name."""
        stacks, self.stacks = self.stacks, {}
        return stacks


def python_stack(info: Optional[ReplicaInfo]) -> Optional[str]:
    """The Python stacks of the replica `info` describes, now (py-spy dump, which ray[default]
    installs, run on the replica's node without pausing it); None where that cannot be had."""
    if info is None:
        return None
    try:
        on_its_node = NodeAffinitySchedulingStrategy(info.node_id, soft=False)
        return ray.get(_py_spy_dump.options(scheduling_strategy=on_its_node).remote(info.pid), timeout=PY_SPY_S)
    except Exception:  # noqa: BLE001  (evidence only: a replica is killed as hung with or without it)
        return None


@ray.remote(num_cpus=0)
def _py_spy_dump(pid: int) -> Optional[str]:
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    done = subprocess.run([py_spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True,
                          timeout=PY_SPY_S)
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def take_errors(refs: Sequence, timeout: float) -> None:
    """Wait up to `timeout` for `refs` and take their errors."""
    refs = list(refs)
    ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001  (expected: these calls met the lost replica)
            pass


def end_hung(members: Sequence[Member], position: int) -> Optional[str]:
    """End the hung replica at `position`: through Ray, and by its pid where it runs on this node
    (ray.kill cannot end a stopped process); its peers stop waiting for it. Returns its Python
    stacks, taken first: evidence of where it hung."""
    stack = python_stack(members[position].info)
    end_replica(members, position)
    return stack


def end_replica(members: Sequence[Member], position: int) -> None:
    """End the replica at `position` (through Ray, and by its pid where it runs on this node:
    ray.kill cannot end a stopped process); its peers stop waiting for it."""
    member = members[position]
    ray.kill(member.actor, no_restart=True)
    kill_if_here(member.info)
    for other, m in enumerate(members):
        if other != position:
            m.actor.abandon.remote(position)


def kill_if_here(info: Optional[ReplicaInfo]) -> None:
    """SIGKILL the replica `info` (what it reported when ready) describes, if it runs on this node."""
    if info is not None and info.node_id == ray.get_runtime_context().get_node_id():
        try:
            os.kill(info.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
