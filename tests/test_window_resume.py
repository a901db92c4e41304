"""A virtio-mmio window taken over by a new instance from the state record (vmmiod/mmio_state.py),
sans-IO: the registers the driver set come back (legacy QueuePFN layout too), the rings are
recovered, one interrupt is raised, and the driver's queues carry on with the new window."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from tests.test_mmio_rig import EchoDevice, RecordingLine, Rig, bring_up, make_rig, roundtrip
from vmmiod.mmio import VirtioMmio
from vmmiod.mmio_regs import (
    DRIVER_OK,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    QUEUE_NOTIFY,
    QUEUE_PFN,
    QUEUE_READY,
    QUEUE_SEL,
    STATUS,
)
from vmmiod.mmio_state import WindowState
from vmmiod.sim.vring import DriverQueue
from vmmiod.state.store import STATE_NAME, StateStore


def _echo(rig: Rig, dq: DriverQueue, payload: bytes) -> bytes:
    """One chain out and back, always kicked (the echo device keeps no avail_event)."""
    out, in_ = rig.buffer(payload), rig.buffer(len(payload))
    dq.add([out], [in_], token="t")
    rig.w(QUEUE_NOTIFY, dq.index)
    rig.w(INTERRUPT_ACK, rig.r(INTERRUPT_STATUS))
    assert dq.get_used() == ("t", len(payload))
    return rig.memory.read(in_[0], len(payload))


def _store(tmp_path: Path, rig: Rig) -> StateStore:
    store = StateStore(tmp_path / STATE_NAME, "g", [rig.device.queue_max_sizes])
    store.open()
    store.set_identity("test:1")
    return store


@pytest.mark.parametrize("version", [1, 2])
def test_window_resumes_where_the_dead_one_left(tmp_path: Path, version: int) -> None:
    rig = make_rig(version)
    store = _store(tmp_path, rig)
    rig.window.state = WindowState(rig.window, store.windows[0])
    dqs = bring_up(rig)
    assert roundtrip(rig, dqs[0], b"before") == b"erofeb"  # the echo device reverses
    regs = {name: getattr(rig.window, name) for name in (
        "status", "features", "driver_features", "config_generation")}
    page_size = rig.window.queue_regs.guest_page_size
    pfns = list(rig.window.queue_regs.queue_pfn)
    store.close()  # the process dies: the file is all that is left
    # The next instance: a new device and window on the same guest memory.
    log = structlog.get_logger()
    device, line = EchoDevice(rig.device.queue_max_sizes, log=log), RecordingLine()
    window = VirtioMmio(device, line, version=version, log=log)
    window.attach(rig.memory)
    store2 = StateStore(tmp_path / STATE_NAME, "g", [device.queue_max_sizes])
    store2.open()
    store2.check_identity("test:1")
    window.state = WindowState(window, store2.windows[0])
    data = store2.windows[0].load()
    assert data is not None
    assert window.state.resume(data, rig.memory) == 0
    assert {name: getattr(window, name) for name in regs} == regs
    assert window.status & DRIVER_OK and device.active
    assert window.queue_regs.queue_pfn == pfns
    assert window.queue_regs.guest_page_size == page_size
    for q in range(len(dqs)):
        window.write(QUEUE_SEL, 4, q)
        if version == 2:
            assert window.read(QUEUE_READY, 4) == 1
        else:
            assert window.read(QUEUE_PFN, 4) == pfns[q] != 0
    assert len(line.events) == 1  # one interrupt: one may have been lost with the process
    assert window.read(INTERRUPT_STATUS, 4) & 1
    rig2 = Rig(window, device, line, rig.memory, rig.ram, rig.alloc)
    assert _echo(rig2, dqs[0], b"after") == b"retfa"
    assert _echo(rig2, dqs[1], b"second queue") == b"eueuq dnoces"
    assert window.read(STATUS, 4) == regs["status"]
    store2.close()
