"""What raytorch calls things wherever they show (console, dashboard, metrics, records): a
replica's name, and where a hung replica's call is stuck, read from a py-spy dump."""

from __future__ import annotations

import re
from typing import Optional

# The file of the replica's actor, as py-spy names its frames: the thread that runs the calls
# has one in its stack.
ACTOR_FILE = "replica/actor.py"


def replica_name(rank: int) -> str:
    """What the console, the dashboard (actor names), metrics and records call replica `rank`."""
    return f"replica-{rank}"


def stuck_in(dump: Optional[str]) -> str:
    """'; stuck in wait (torch/distributed/...:123)': the innermost frame of the thread that runs
    the replica's calls, read from a py-spy dump; '' without one."""
    if not dump:
        return ""
    threads = [block.splitlines() for block in re.split(r"\n(?=Thread )", dump) if block.startswith("Thread ")]
    frames = [[line.strip() for line in thread[1:] if line.startswith(" ")] for thread in threads]
    calls = [stack for stack in frames if any(ACTOR_FILE in frame for frame in stack)] or [f for f in frames if f]
    return f"; stuck in {calls[0][0]}" if calls else ""
