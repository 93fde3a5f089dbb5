"""`ray up` for real: cluster-local.yaml against an sshd on 127.0.0.1, a job, the dashboard, `ray down`.

    python -m pytest -q tests/test_ray_up.py -s     # prints the time from `ray up` to the first epoch

Needs Debian's openssh-server and rsync; skipped without them, and deselected by `-m "not ray_up"`.
All it starts listens on 127.0.0.1 and keeps its files in directories of its own; at the end it ends
by pid the processes that use those directories (argv or open files) and their children, never by
name, so other Ray instances on the machine are left alone.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from getpass import getuser
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SSHD = "/usr/sbin/sshd"
HANG_GUARD_S = 120  # per command: a guard against hangs, not a timing assertion
TRAIN = "python scripts/train.py --address auto --epochs 1 --workers 1"  # the job, run on the head

# Registered in pyproject.toml's `markers`; `-m "not ray_up"` deselects this module.
pytestmark = [pytest.mark.ray_up, pytest.mark.system]

SSHD_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {dir}/host_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/client_key.pub
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
# Ray runs every remote command as `bash --login -c -i 'source ~/.bashrc; ...'`: a HOME of the
# test's own gives those shells the test's ~/.bashrc, and root's start-up files stay untouched.
SetEnv HOME={home}
"""

# The "node's" environment: what the README's install and cluster-local.yaml's last setup command
# give a real node (the venv on PATH, token auth), plus what this machine needs.
BASHRC = """\
export PATH={home}/bin:{venv_bin}:$PATH
export RAY_AUTH_MODE=token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # Ray on 127.0.0.1, not on the host's address
export RAY_TMPDIR={ray_dir}                  # this cluster's Ray files, apart from any other Ray here
export PYTHONPATH={home}/raytorch/src        # run the synced copy, as a node does
"""

# `ray down` runs a bare `ray stop`, which ends every Ray on the machine, other tests' too. On this
# node `ray stop` ends only the Ray whose files are under the node's RAY_TMPDIR.
RAY_SHIM = """\
#!/bin/sh
[ "$1" = stop ] && exec {python} {this} end {ray_dir}
exec {venv_bin}/ray "$@"
"""


def _hash(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:10]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Processes, found by the directories this test made: /proc only, no names


def _ppids() -> dict[int, int]:
    ppids = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppids[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    return ppids


def _uses(pid: int, prefixes: tuple[str, ...]) -> bool:
    """Whether a path under one of `prefixes` is in the process's argv or among its open files."""
    try:
        if any(p in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") for p in prefixes):
            return True
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefixes) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # gone, or a kernel thread
        return False


def started_under(*dirs) -> set[int]:
    """Processes that use files under `dirs`, with their descendants; never this one or its parents.

    Open files find Ray's processes whatever their title (Ray renames its workers, e.g. `ray::IDLE`).
    """
    prefixes = tuple(str(d).rstrip("/") + "/" for d in dirs)
    ppids = _ppids()
    pid, ancestors = os.getpid(), set()
    while pid > 1 and pid not in ancestors:
        ancestors.add(pid)
        pid = ppids.get(pid, 0)
    found = {pid for pid in ppids if pid not in ancestors and _uses(pid, prefixes)}
    while children := {pid for pid, ppid in ppids.items() if ppid in found} - found - ancestors:
        found |= children
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def end_processes(pids: set[int], grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL what still runs after `grace_s`, as `ray stop` does (a node's processes
    exit within a second of SIGTERM, but its GCS server, seen here, not within 10 s)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while (pids := {p for p in pids if _running(p)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pids:
            return


# ----------------------------------------------------------------------------------------------
# The node (sshd on 127.0.0.1), the cluster config, the CLI


@pytest.fixture
def node(tmp_path):
    """An sshd on 127.0.0.1 that takes a key made here, for a HOME and a RAY_TMPDIR of the test's own."""
    if not os.access(SSHD, os.X_OK) or not all(map(shutil.which, ("ssh", "ssh-keygen", "rsync"))):
        pytest.skip("needs Debian's openssh-server (/usr/sbin/sshd, ssh, ssh-keygen) and rsync")
    if os.geteuid() != 0:
        pytest.skip("the test's sshd takes root logins: run as root")
    # Ray's unix sockets live under RAY_TMPDIR, and a socket path has at most 107 bytes: keep it short.
    ray_dir = Path(tempfile.mkdtemp(prefix="rtup-", dir="/tmp"))
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    name = f"raytorch-test-{uuid.uuid4().hex[:8]}"
    sshd = None
    try:
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", tmp_path / key],
                           check=True, timeout=30)
        port = free_port()
        (tmp_path / "sshd_config").write_text(SSHD_CONFIG.format(port=port, dir=tmp_path, home=home))
        fill = dict(home=home, venv_bin=VENV_BIN, ray_dir=ray_dir, python=sys.executable, this=__file__)
        (home / ".bashrc").write_text(BASHRC.format(**fill))
        (home / "bin" / "ray").write_text(RAY_SHIM.format(**fill))
        (home / "bin" / "ray").chmod(0o755)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
        sshd = subprocess.Popen([SSHD, "-D", "-f", tmp_path / "sshd_config", "-E", tmp_path / "sshd.log"])
        deadline = time.monotonic() + 30
        while not (tmp_path / "sshd.pid").exists():  # written once sshd listens
            assert sshd.poll() is None and time.monotonic() < deadline, (tmp_path / "sshd.log").read_text()
            time.sleep(0.05)
        yield dict(name=name, port=port, dir=tmp_path, home=home, ray_dir=ray_dir)
    finally:
        end_processes(started_under(tmp_path, ray_dir))
        if sshd is not None:
            sshd.wait(timeout=30)
        shutil.rmtree(ray_dir, ignore_errors=True)
        # Ray's ssh ControlPath: /tmp/ray_ssh_<user hash>/<cluster name hash>/ (command_runner.py).
        control = Path("/tmp") / f"ray_ssh_{_hash(getuser())}" / _hash(name)
        shutil.rmtree(control, ignore_errors=True)
        with contextlib.suppress(OSError):
            control.parent.rmdir()  # if no other cluster uses it


def cluster_config(node, ports: dict[str, int]) -> dict:
    """cluster-local.yaml pointed at the node: what a user fills in, plus what this machine needs."""
    config = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    config["cluster_name"] = node["name"]
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {
        "ssh_user": "root",
        "ssh_private_key": str(node["dir"] / "client_key"),
        # Ray's ssh takes no port: reach the test's sshd through a relay on stdin/stdout.
        "ssh_proxy_command": f"{sys.executable} {__file__} relay 127.0.0.1 {node['port']}",
    }
    # A real node downloads torch here; this one has the venv already: check it instead.
    config["setup_commands"] = ["python -c 'import raytorch, torch'"]
    # Free ports, a CPU for the one replica, and no bare `ray stop` (see RAY_SHIM).
    config["head_start_ray_commands"] = [
        f"{sys.executable} {__file__} end {node['ray_dir']}",
        "ray start --head --num-cpus=1 --dashboard-host=127.0.0.1 --disable-usage-stats "
        "--autoscaling-config=~/ray_bootstrap_config.yaml " + " ".join(f"--{f}={p}" for f, p in ports.items()),
    ]
    config["worker_start_ray_commands"] = []
    return config


def start(args, node) -> subprocess.Popen:
    """A Ray CLI command, run from the repository root as a user would, in its own process group."""
    # The "laptop" shares HOME (so the auth token) with the node, not its temporary files.
    laptop_tmp = node["dir"] / "laptop-tmp"
    laptop_tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HOME=str(node["home"]), RAY_TMPDIR=str(laptop_tmp), TMPDIR=str(laptop_tmp),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.Popen([VENV_BIN / "ray", *map(str, args)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run(args, node, on_line=None) -> tuple[int, str]:
    """Run a Ray CLI command to its end (its whole process group ends on a hang): exit code, output."""
    proc = start(args, node)
    guard = threading.Timer(HANG_GUARD_S, os.killpg, (proc.pid, signal.SIGKILL))
    guard.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line:
                on_line(line)
        proc.wait()
    finally:
        guard.cancel()
    return proc.returncode, "".join(lines)


def ok(result: tuple[int, str]) -> str:
    code, out = result
    assert code == 0, f"exit code {code}:\n{out}"
    return out


def get_json(url: str, token: str | None = None, deadline_s: float = 30.0):
    """GET url, waiting for its port to open; (HTTP status, body)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, None
        except (urllib.error.URLError, ConnectionError):  # not listening yet, or not forwarding yet
            assert time.monotonic() < deadline, f"nothing answers at {url}"
            time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# The test


def test_ray_up_job_dashboard_and_ray_down(node):
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "ray-client-server-port")}
    config_file = node["dir"] / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(cluster_config(node, ports)))
    ok(run(["get-auth-token", "--generate"], node))  # the token that cluster-local.yaml's file_mounts sync
    token = (node["home"] / ".ray" / "auth_token").read_text().strip()
    times = {}

    def note_first_epoch(line):
        if line.startswith("Epoch 0:"):
            times.setdefault("first epoch", time.monotonic())

    times["start"] = time.monotonic()
    try:
        ok(run(["up", "-y", "--no-config-cache", "--disable-usage-stats", config_file], node))
        times["up"] = time.monotonic()
        job = ok(run(["exec", config_file, f"cd ~/raytorch && {TRAIN}"], node, on_line=note_first_epoch))
        # The dashboard listens on the node's 127.0.0.1; `ray dashboard` forwards it over SSH.
        local_port = free_port()
        forward = start(["dashboard", "--port", local_port, "--remote-port", ports["dashboard-port"], config_file],
                        node)
        try:
            no_token = get_json(f"http://127.0.0.1:{local_port}/api/jobs/")
            status, jobs = get_json(f"http://127.0.0.1:{local_port}/api/jobs/", token)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(forward.pid, signal.SIGTERM)
            forward.wait(timeout=30)
    finally:
        down = run(["down", "-y", config_file], node)  # checked below, after what failed above
    if "first epoch" in times:
        print(f"\n`ray up` took {times['up'] - times['start']:.1f} s; "
              f"first 'Epoch 0' line {times['first epoch'] - times['start']:.1f} s after `ray up` started")

    assert re.search(r"^Epoch 0: loss=[\d.]+ ", job, re.M), job
    assert f"Ray at 127.0.0.1:{ports['port']}" in job, job  # joined the cluster's head, on loopback
    assert (node["home"] / "raytorch" / "scripts" / "train.py").exists()  # file_mounts synced the project
    assert not {".git", ".venv"} & {p.name for p in (node["home"] / "raytorch").iterdir()}  # not synced
    assert no_token[0] == 401  # token authentication is on
    assert status == 200 and [j["status"] for j in jobs if j["entrypoint"] == TRAIN] == ["SUCCEEDED"], jobs
    ok(down)
    assert not started_under(node["ray_dir"]), down  # nothing holds the cluster's Ray files any more


# ----------------------------------------------------------------------------------------------
# What the node runs: `python tests/test_ray_up.py relay HOST PORT`, `... end RAY_TMPDIR`


def relay(host: str, port: int) -> None:
    """Copy stdin to a TCP connection and the connection to stdout: an ssh ProxyCommand."""
    conn = socket.create_connection((host, port), timeout=30)
    conn.settimeout(None)

    def upstream():
        while data := os.read(0, 65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    while data := conn.recv(65536):
        os.write(1, data)


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        relay(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "end":
        end_processes(started_under(sys.argv[2]))
