"""Every wire is a Wire (wire/protocol.py): each member the replica calls, with the protocol's
signature. In-process, no Ray: a wire that drifts from the protocol fails here, not in a run."""

import inspect
import socket

import numpy as np
import pytest
import torch

from raytorch.wire.collective import CollectiveWire, close
from raytorch.wire.object_store import ObjectStoreWire
from raytorch.wire.protocol import Wire
from raytorch.wire.shared_memory import SHM_DIR, SharedMemoryWire

WIRES = [ObjectStoreWire, SharedMemoryWire, CollectiveWire]
METHODS = sorted(name for name, value in vars(Wire).items() if not name.startswith("_") and callable(value))
FIELDS = sorted(Wire.__annotations__)


def shape(method) -> list[tuple[str, inspect._ParameterKind, object]]:
    """What a caller relies on: each parameter's name, kind and default (annotations aside)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]


def test_the_protocol_names_what_the_replica_calls():
    assert METHODS == ["abandon", "all_reduce", "applied", "fail", "publish", "target"]
    assert FIELDS == ["buffer_bytes", "kind", "waited"]


@pytest.mark.parametrize("wire", WIRES, ids=lambda w: w.__name__)
def test_every_wire_has_each_method_of_the_protocol_with_its_signature(wire):
    for name in METHODS:
        assert callable(getattr(wire, name, None)), f"{wire.__name__} has no {name}"
        assert shape(getattr(wire, name)) == shape(getattr(Wire, name)), f"{wire.__name__}.{name}"


@pytest.fixture
def wires(request):
    """One wire of each kind, built: the shared-memory wire's buffers in /dev/shm (removed after),
    the collective wire in a gloo group of one on loopback."""
    if not SHM_DIR.is_dir():
        pytest.skip("needs /dev/shm")
    shared = SharedMemoryWire(0, 4, np.float32, f"raytorch-test-{request.node.name}")
    shared.unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    collective = CollectiveWire(0, 1, "127.0.0.1", port, 30.0, torch.zeros(5), [(0, 4)])
    try:
        yield [ObjectStoreWire(), shared, collective]
    finally:
        close()


def test_every_wire_built_is_a_wire_with_the_protocols_fields(wires):
    for wire in wires:
        assert isinstance(wire, Wire), type(wire).__name__
        assert wire.kind in ("object_store", "shared_memory", "collective")
        assert isinstance(wire.waited, float) and isinstance(wire.buffer_bytes, int), type(wire).__name__
    assert [wire.kind for wire in wires] == ["object_store", "shared_memory", "collective"]
