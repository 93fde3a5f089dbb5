"""A local Ray outlives a driver killed with SIGKILL: Ray ties its head processes to the driver
(the kernel kills them with it), but not the agents the raylet starts (DashboardAgent,
RuntimeEnvAgent: measured still running 20 s after the driver died). So a driver that starts a
local Ray also starts this watchdog, a small process of its own session:

    python .../raytorch/watchdog.py <driver pid>

Every half second it notes the driver's descendants (pid and start time, so a reused pid is never
hit); once the driver is gone, it SIGKILLs those still alive and exits. A driver that ends normally
stops it first (ray.shutdown ends Ray's processes itself). Only processes the driver started are
touched, never any other Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

POLL_S = 0.5


def start(driver_pid: int) -> subprocess.Popen:
    """The watchdog of `driver_pid`, in a session of its own (a signal to the driver's group spares it)."""
    # run as a file, not through the package: up at once, without importing torch and Ray
    return subprocess.Popen([sys.executable, __file__, str(driver_pid)], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def watch(driver_pid: int) -> int:
    """Note the driver's descendants until it is gone, then kill them; returns how many it killed."""
    seen: dict[int, float] = {}
    try:
        driver = psutil.Process(driver_pid)
        while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
            for child in driver.children(recursive=True):
                if child.pid == os.getpid():
                    continue
                try:
                    seen[child.pid] = child.create_time()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(POLL_S)
    except psutil.NoSuchProcess:
        pass
    killed = 0
    for pid, created in seen.items():
        try:
            if psutil.Process(pid).create_time() == created:
                os.kill(pid, signal.SIGKILL)
                killed += 1
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
