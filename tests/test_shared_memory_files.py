"""The shared-memory wire's files in /dev/shm: only this user's replicas can read the gradients and
parameters in them (0600), and a name that exists already, or a link planted at it, is refused,
never written through."""

import os
import stat
import uuid

import numpy as np
import pytest

from raytorch.wire.shared_memory import SHM_DIR, SharedMemoryWire

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")


def test_the_wires_files_are_this_users_alone():
    wire = SharedMemoryWire(0, 1000, np.dtype(np.float32), f"raytorch-test-{uuid.uuid4().hex[:8]}",
                            world=2, shared=("params",))
    try:
        modes = {os.path.basename(p): stat.S_IMODE(os.stat(p).st_mode) for p in wire.paths}
        assert len(modes) == 7 and set(modes.values()) == {0o600}, modes
        assert all(os.stat(p).st_uid == os.getuid() for p in wire.paths)
    finally:
        wire.unlink()


def test_a_link_planted_at_a_wire_name_is_refused_and_its_target_untouched(tmp_path):
    prefix = f"raytorch-test-{uuid.uuid4().hex[:8]}"
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    planted = SHM_DIR / f"{prefix}-rank0-grad0"
    planted.symlink_to(victim)
    try:
        with pytest.raises(FileExistsError):
            SharedMemoryWire(0, 1000, np.dtype(np.float32), prefix, world=2)
        assert victim.read_bytes() == b"not yours"
    finally:
        planted.unlink()
        for leftover in SHM_DIR.glob(f"{prefix}-*"):
            leftover.unlink()
