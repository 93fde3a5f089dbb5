"""`raytorch train --submit`: the run as a Ray job (Ray's Job Submission SDK), so the dashboard's Jobs
page holds its log, status and duration. The current directory goes along as the job's working
directory (your model and data modules with it), the entrypoint is the same `raytorch train` with
the same flags; the console follows the job's log until it ends (Ctrl-C stops following, not the
job), and the exit code is the job's. --detach returns once the job is submitted."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import ClusterError, ConfigError

# Not uploaded with the working directory: what is big and not needed to run.
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pt", "*.safetensors", "runs", "wandb", "mlruns"]
OWN_FLAGS = ("--submit", "--detach")


def dashboard_url(address: Optional[str]) -> str:
    """The Job Submission address: http://... as given, else the dashboard of the cluster at
    `address` (auto, host:port; default RAY_ADDRESS), asked of the cluster itself."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("address", "--submit sends the run to a cluster: give --address (auto, host:port of its "
                                     "GCS, or http://host:8265, its dashboard)")
    if address.startswith(("http://", "https://")):
        return address
    from .compat import rayprivate
    from .group.cluster import ray_session

    with ray_session(address):
        url = rayprivate.dashboard_url()
    if not url:
        raise ClusterError(f"the cluster at {address} runs no dashboard: start it with one to submit jobs")
    return f"http://{url}"


def job_command(argv: Sequence[str]) -> str:
    """The job's entrypoint: this command's flags, less --submit, --detach and --address (the job
    joins its cluster through the RAY_ADDRESS Ray gives it)."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in OWN_FLAGS:
            continue
        elif arg == "--address":
            skip = True
        elif not arg.startswith("--address="):
            args.append(arg)
    return shlex.join(["python", "-m", "raytorch.cli", "train", *args])


def submit(argv: Sequence[str], address: Optional[str], detach: bool, name: str) -> int:
    """Submit, then follow the log to the end unless `detach`; returns the job's exit code."""
    from ray.job_submission import JobSubmissionClient

    if (Path.home() / ".ray" / "auth_token").exists() or os.environ.get("RAY_AUTH_TOKEN"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # the SDK sends the cluster's token
    url = dashboard_url(address)
    try:
        client = JobSubmissionClient(url)
        job_id = client.submit_job(entrypoint=job_command(argv), metadata={"job_name": name},
                                   runtime_env={"working_dir": os.getcwd(), "excludes": EXCLUDES})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"could not submit to {url}: {e}") from e
    print(f"Job {job_id} submitted to {url} (dashboard: {url}/#/jobs/{job_id})", flush=True)
    if detach:
        print(f"follow it with: RAY_AUTH_MODE=token ray job logs --address {url} --follow {job_id}")
        return 0
    try:
        asyncio.run(follow(client, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following {job_id}; it goes on (ray job stop --address {url} {job_id} stops it)",
              file=sys.stderr)
        return 130
    return exit_code(client, job_id)


async def follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def exit_code(client, job_id: str) -> int:
    """The job's driver's exit code once the job has ended (0 where it succeeded)."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + 60
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    print(f"raytorch: job {job_id} {info.status.value.lower()}: {info.message or ''}".rstrip(": "), file=sys.stderr)
    code = getattr(info, "driver_exit_code", None)
    return code if code else 1
