"""Waiting, in tests, for what another process does (writes a file, reports a metric): poll it."""

import time


def wait_for(condition, what: str, timeout_s: float = 300.0, every_s: float = 0.05):
    """Poll `condition` until it returns something true, and return that; fail after `timeout_s`:
    a guard against a hang, not a timing assertion (what takes seconds here took over a minute
    while other test runs loaded this 2-core machine)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        time.sleep(every_s)
    return value
