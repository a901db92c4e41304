"""The generic IOREQ channel end to end: the simulated guest (this thread) against the adaptor,
bus, windows and real devices on an event loop in a background thread of this process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.inproc import ThreadedDaemon
from vmmiod.config import BlockConfig, GuestConfig, MmioConfig
from vmmiod.devices.block import BlockDevice
from vmmiod.hypervisors.generic import protocol as proto
from vmmiod.sim.block import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlockDriver, run_block_workload
from vmmiod.sim.virtio_mmio import MAGIC, STATUS
from vmmiod.sim.vmm import SimError, SimVmm

BASE, IRQ = 0x0200_0000, 33


def image(tmp_path: Path, size: int = 8 << 20) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(size)
    return img


def block_device(img: Path) -> BlockDevice:
    return BlockDevice(BlockConfig("vda", MmioConfig(BASE, IRQ), img), GuestConfig("t"))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ThreadedDaemon]:
    with ThreadedDaemon(tmp_path / "vmm.sock", [(block_device(image(tmp_path)), BASE, IRQ)]) as td:
        yield td


def test_block_workload_through_the_channel(daemon: ThreadedDaemon, tmp_path: Path) -> None:
    with SimVmm() as vmm:
        server = vmm.connect(daemon.socket_path)
        assert server.windows == (proto.Window(BASE, 0x200, IRQ),)
        dev = BlockDriver(vmm, server.windows[0])
        dev.start()
        result = run_block_workload(dev, span=2 << 20, random_ops=100,
                                    image_path=str(tmp_path / "disk.img"))
        assert result["failures"] == []
        assert result["serial"] == "t-vda"
        dev.stop()
        assert daemon.call(lambda: daemon.adaptor.counters["ioreqs"]) == vmm.ioreqs
    assert daemon.call(lambda: daemon.adaptor.counters["ioreqs_unanswered"]) == 0


def test_every_vcpu_has_its_own_slot(tmp_path: Path) -> None:
    with ThreadedDaemon(tmp_path / "vmm.sock", [(block_device(image(tmp_path)), BASE, IRQ)]) as td:
        with SimVmm(vcpus=4) as vmm:
            vmm.connect(td.socket_path)
            for vcpu in (3, 0, 2, 1):
                assert vmm.read(BASE, 4, vcpu=vcpu) == MAGIC
            vmm.write(BASE + STATUS, 1, vcpu=2)  # ACKNOWLEDGE from one vCPU ...
            assert vmm.read(BASE + STATUS, vcpu=3) == 1  # ... seen from another


def test_disconnect_resets_devices_and_next_vmm_is_served(daemon: ThreadedDaemon) -> None:
    pattern = bytes(range(256)) * 16
    with SimVmm() as vmm:
        dev = BlockDriver(vmm, vmm.connect(daemon.socket_path).windows[0])
        dev.start()
        assert dev.request(VIRTIO_BLK_T_OUT, 8, pattern).status == 0
        assert daemon.call(lambda: daemon.windows[0].device.active)
    # The VMM is gone: the window was reset, the memory forgotten, the daemon still listens.
    deadline = time.monotonic() + 5
    while daemon.call(lambda: daemon.adaptor.connected) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not daemon.call(lambda: daemon.adaptor.connected)
    assert not daemon.call(lambda: daemon.windows[0].device.active)
    assert daemon.call(lambda: daemon.bus.memory) is None
    assert not daemon.adaptor.finished.done()
    with SimVmm(ram_size=16 << 20, ram_gpa=0x8000_0000) as vmm:  # a different guest layout
        vmm.connect(daemon.socket_path)
        assert vmm.read(BASE + STATUS) == 0  # a fresh device: no status left from before
        dev = BlockDriver(vmm, vmm.server.windows[0])  # type: ignore[union-attr]
        dev.start()
        res = dev.request(VIRTIO_BLK_T_IN, 8, length=len(pattern))
        assert res.status == 0 and res.data == pattern
    assert daemon.call(lambda: daemon.adaptor.counters["connections"]) == 2


def test_a_wake_up_of_a_gone_connection_is_ignored(daemon: ThreadedDaemon) -> None:
    """Each vCPU's reader is bound to its connection (fds, slot, page): one that runs after that
    connection is gone (its wake-up collected in the same turn as the socket's EOF) touches
    nothing, not even the next VMM's READY slot on an eventfd that reuses the old fd number."""
    with SimVmm() as vmm:
        vmm.connect(daemon.socket_path)
        stale = daemon.call(lambda: list(daemon.adaptor._conn.readers))  # type: ignore[union-attr]
        assert len(stale) == 1 and vmm.read(BASE) == MAGIC
    deadline = time.monotonic() + 5
    while daemon.call(lambda: daemon.adaptor.connected) and time.monotonic() < deadline:
        time.sleep(0.01)
    with SimVmm() as vmm:
        vmm.connect(daemon.socket_path)
        ioreqs = daemon.call(lambda: daemon.adaptor.counters["ioreqs"])
        vmm.page[30] = 0x21  # vCPU 0: a READY read of address 0

        def stale_wake_up() -> tuple[int, int]:
            os.write(vmm.req_fds[0], (1).to_bytes(8, "little"))  # the kick, then the old reader
            stale[0]()  # in the same callback: the new connection's reader cannot run between
            return vmm.page[30], daemon.adaptor.counters["ioreqs"]

        assert daemon.call(stale_wake_up) == (0x21, ioreqs)  # untouched by the old reader
        deadline = time.monotonic() + 5  # the new connection's own reader answers the kick
        while vmm.page[30] & 0xF != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vmm.page[30] == 0x23
        vmm._wait_response(0)  # take its response, then the slot is the VMM's again
        vmm.page[30] = 0
        assert vmm.read(BASE) == MAGIC
        assert daemon.call(lambda: daemon.adaptor.counters["ioreqs"]) == ioreqs + 2


def test_vmm_killed_mid_session(daemon: ThreadedDaemon) -> None:
    """A VMM process that dies without a word (SIGKILL) is a disconnect like any other."""
    code = textwrap.dedent(f"""
        import sys, time
        from vmmiod.sim.vmm import SimVmm
        from vmmiod.sim.block import BlockDriver
        vmm = SimVmm()
        dev = BlockDriver(vmm, vmm.connect({str(daemon.socket_path)!r}).windows[0])
        dev.start()
        print("ready", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert daemon.call(lambda: daemon.windows[0].device.active)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 5
    while daemon.call(lambda: daemon.adaptor.connected) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not daemon.call(lambda: daemon.windows[0].device.active)
    with SimVmm() as vmm:
        dev = BlockDriver(vmm, vmm.connect(daemon.socket_path).windows[0])
        dev.start()
        assert dev.request(VIRTIO_BLK_T_IN, 0, length=512).status == 0


def test_on_disconnect_exit_resolves_finished(tmp_path: Path) -> None:
    with ThreadedDaemon(tmp_path / "vmm.sock", [(block_device(image(tmp_path)), BASE, IRQ)],
                        on_disconnect="exit") as td:
        with SimVmm() as vmm:
            vmm.connect(td.socket_path)
            assert not td.adaptor.finished.done()
        deadline = time.monotonic() + 5
        while not td.adaptor.finished.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert td.call(lambda: td.adaptor.finished.result()) == 0


def test_level_interrupt_lines(daemon: ThreadedDaemon, tmp_path: Path) -> None:
    with SimVmm(irq_mode=proto.IRQ_MODE_LEVEL) as vmm:
        dev = BlockDriver(vmm, vmm.connect(daemon.socket_path).windows[0])
        dev.start()
        result = run_block_workload(dev, span=1 << 20, random_ops=40)
        assert result["failures"] == []
        assert dev.drv.interrupts > 0
        # After the last ACK the line was lowered again.
        assert vmm.irq_level[IRQ] is False or vmm.read(BASE + 0x60) != 0


def test_lines_are_silent_without_a_vmm(daemon: ThreadedDaemon) -> None:
    line = daemon.adaptor.interrupt_line(IRQ)
    assert daemon.adaptor.interrupt_line(IRQ) is line
    before = dict(daemon.adaptor.counters)
    daemon.call(line.raise_)
    daemon.call(line.lower)
    assert daemon.adaptor.counters == before


def test_daemon_going_away_wakes_the_guest(daemon: ThreadedDaemon) -> None:
    with SimVmm(timeout=30) as vmm:
        vmm.connect(daemon.socket_path)
        assert vmm.read(BASE) == MAGIC
        daemon.run(daemon.adaptor.stop())
        t0 = time.monotonic()
        with pytest.raises(SimError):
            vmm.read(BASE)
        assert time.monotonic() - t0 < 25  # noticed through the socket, not the timeout
    assert not os.path.exists(daemon.socket_path)


def test_legacy_v1_window(tmp_path: Path) -> None:
    with ThreadedDaemon(tmp_path / "vmm.sock", [(block_device(image(tmp_path)), BASE, IRQ)],
                        version=1) as td, SimVmm() as vmm:
        dev = BlockDriver(vmm, vmm.connect(td.socket_path).windows[0])
        dev.start()
        assert dev.drv.version == 1
        result = run_block_workload(dev, span=1 << 20, random_ops=40)
        assert result["failures"] == []
