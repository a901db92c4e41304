"""Units of the vhost-user adaptor that the end-to-end tests reach only by chance: the memory
table's checks, SET_CONFIG, the Transport's config-change and fault signals, and a corrupted
inflight record handed back by the front-end."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.test_vhost_user import block_device
from tests.test_vhost_user_inflight import HoldingDevice
from tests.vhost_user_peer import FrontEnd, ThreadedVhost, sealed_memfd
from vmmiod.devices.base import VirtioDevice
from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.hypervisors.vhost_user.device import VhostTransport
from vmmiod.hypervisors.vhost_user.memtable import VhostMemory, check_memory_fd
from vmmiod.hypervisors.vhost_user.vring import VhostQueue, Vring
from vmmiod.memory import MappedMemory
from vmmiod.sim.sockets import connect_unix as connect

MiB = 1 << 20


def reason(fn: Any, *args: Any) -> str:
    with pytest.raises(w.MessageError) as info:
        fn(*args)
    return info.value.reason


def test_memory_fds_that_could_be_taken_away_are_refused(tmp_path: Path) -> None:
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, MiB)
    fd, _ = tempfile.mkstemp(dir=tmp_path)
    os.ftruncate(fd, MiB)
    sealed = sealed_memfd(MiB)
    r, wr = os.pipe()
    try:
        assert reason(check_memory_fd, unsealed, MiB, "r") == "bad_memory_fd"  # no seal
        assert reason(check_memory_fd, fd, MiB, "r") == "bad_memory_fd"  # a file
        assert reason(check_memory_fd, r, 1, "r") == "bad_memory_fd"  # not a file at all
        assert reason(check_memory_fd, sealed, 2 * MiB, "r") == "bad_memory_fd"  # too short
        check_memory_fd(sealed, MiB, "r")
        assert fcntl.fcntl(sealed, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    finally:
        for x in (unsealed, fd, sealed, r, wr):
            os.close(x)


def test_memory_table_add_translate_remove() -> None:
    fd = sealed_memfd(2 * MiB)
    mem = VhostMemory()
    try:
        a = w.MemRegion(0x1000_0000, MiB, 0x7000_0000, 0)
        b = w.MemRegion(0x2000_0000, MiB, 0x7100_0000, MiB)
        assert mem.add(a, fd) and mem.add(b, fd)
        assert not mem.add(a, fd)  # the very same region again: tolerated, not mapped twice
        assert reason(mem.add, w.MemRegion(0x1000_8000, 4096, 0x7200_0000, 0), fd) \
            == "overlapping_regions"  # guest range
        assert reason(mem.add, w.MemRegion(0x3000_0000, 4096, 0x7000_1000, 0), fd) \
            == "overlapping_regions"  # user range
        assert reason(mem.add, w.MemRegion(0x4000_0000, 4096, 0x7300_0000, 100), fd) \
            == "bad_region"  # offset not page aligned
        assert reason(mem.add, w.MemRegion(0x4000_0000, 0, 0x7300_0000, 0), fd) == "bad_region"
        assert mem.uva_to_gpa(0x7100_0010, 16, "ring") == 0x2000_0010
        assert reason(mem.uva_to_gpa, 0x70FF_FFF8, 16, "ring") == "ring_outside_memory"
        mem.write(0x2000_0000, b"second half")  # the region maps the fd at its offset
        assert os.pread(fd, 11, MiB) == b"second half"
        gen = mem.generation
        mem.remove(b)
        assert mem.generation != gen  # rings look their views up again
        assert reason(mem.remove, b) == "unknown_region"
        assert reason(mem.uva_to_gpa, 0x7100_0010, 16, "ring") == "ring_outside_memory"
    finally:
        mem.close()
        os.close(fd)


def test_transport_signals() -> None:
    counters = {"calls": 0, "calls_dropped": 0, "config_changes_unsent": 0, "device_faults": 0}
    vr = Vring(VhostQueue(16, 0))
    call, err = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    faults: list[str] = []
    logged: list[str] = []

    class Log:
        def info(self, event: str, **kw: Any) -> None:
            logged.append(event)

    t = VhostTransport([vr], counters, Log(), faults.append)
    try:
        t.signal_used(0)  # no call fd yet: dropped, counted
        vr.set_fd("call_fd", call)
        vr.set_fd("err_fd", err)
        t.signal_used(0)
        assert os.eventfd_read(call) == 1
        t.signal_config_change()
        t.signal_config_change()
        assert counters == {"calls": 1, "calls_dropped": 1, "config_changes_unsent": 2,
                            "device_faults": 0}
        assert logged == ["vhost_user_config_change_unsent"]  # once per connection
        vr.started = True
        t.device_fault("bad ring")
        assert faults == ["bad ring"] and select.select([err], [], [], 0)[0] == [err]
    finally:
        vr.close_fds()


def test_set_config_reaches_the_device(tmp_path: Path) -> None:
    dev = block_device(tmp_path)
    sock = str(tmp_path / "disk0.sock")
    with ThreadedVhost([("disk0", dev, sock)]) as d:
        fe = FrontEnd(connect(sock))
        try:
            fe.negotiate()
            assert d.call(lambda: dev.writeback) is True
            fe.ack(w.SET_CONFIG, w.pack_config(32, 1, 0, b"\0"))  # writeback off (CONFIG_WCE)
            assert d.call(lambda: dev.writeback) is False
            fe.send(w.GET_CONFIG, w.pack_config(32, 1))
            assert fe.recv_reply(w.GET_CONFIG)[12:] == b"\0"
            fe.ack(w.SET_CONFIG, w.pack_config(24, 12, 0, bytes(12)))  # read-only: ignored
            assert fe.call_u64(w.GET_QUEUE_NUM) == 1  # and the connection lives on
        finally:
            fe.close()


def test_a_corrupted_inflight_record_starts_afresh(tmp_path: Path) -> None:
    dev = HoldingDevice()
    sock = str(tmp_path / "hold.sock")
    with ThreadedVhost([("hold", dev, sock)]) as d:
        fe = FrontEnd(connect(sock))
        try:
            fe.negotiate()
            fe.add_mem_reg()
            fe.send(w.GET_INFLIGHT_FD, w.pack_inflight(w.Inflight(0, 0, 1, 16)))
            payload, fds = fe.recv_reply_fds(w.GET_INFLIGHT_FD)
            info = w.Inflight(*w.INFLIGHT.unpack(payload))
            # A record that says version 1 for 16 entries, with head 15 in flight twice over.
            os.pwrite(fds[0], (1).to_bytes(2, "little") + (16).to_bytes(2, "little"), 8)
            os.pwrite(fds[0], b"\x07", 16 + 16 * 15)
            fe.ack(w.SET_INFLIGHT_FD, w.pack_inflight(info), (fds[0],))
            os.close(fds[0])
            fe.start_ring(0, size=16)
            d.call(lambda: setattr(dev, "complete_at_once", True))
            buf = fe.alloc.alloc(16)
            fe.rings[0].q.add([], [(buf, 16)], "fresh")
            fe.kick(0)
            assert [t for t, _ in fe.wait_used(0, 1)] == ["fresh"]
            assert d.call(lambda: dev.popped) == [0]  # nothing "redone" from the bad record
        finally:
            fe.close()


class _Drained(VirtioDevice):
    """A device that records when its queue runs (in a kick's callback or on a later turn)."""

    def __init__(self) -> None:
        super().__init__("drained", [8])
        self.runs: list[str] = []
        self.phase = ""

    def process_queue(self, index: int) -> None:
        self.runs.append(self.phase)


def test_a_kick_drains_the_queue_in_its_own_callback() -> None:
    """queue_kicked (the vhost-user kick fd's reader) runs the queue at once, where
    queue_notify (a vCPU's exit) only schedules it; a run already scheduled keeps its turn."""

    class Ready:
        ready = True

    async def go() -> list[str]:
        dev = _Drained()
        dev.activate(MappedMemory(), [Ready()], 0, None)  # type: ignore[list-item, arg-type]
        dev.phase = "kicked"
        dev.queue_kicked(0)
        dev.phase = "notify"
        dev.queue_notify(0)  # scheduled: runs after this callback
        dev.phase = "kicked-while-scheduled"
        dev.queue_kicked(0)  # the scheduled run covers it: no second run
        dev.phase = "later"
        await asyncio.sleep(0)
        dev.reset()
        return dev.runs

    assert asyncio.run(go()) == ["kicked", "later"]


def test_the_adaptor_hands_kicks_to_queue_kicked(tmp_path: Path) -> None:
    class Recording(HoldingDevice):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def queue_notify(self, index: int) -> None:
            self.calls.append("notify")
            super().queue_notify(index)

        def queue_kicked(self, index: int) -> None:
            self.calls.append("kicked")
            super().queue_notify(index)

    dev = Recording()
    sock = str(tmp_path / "rec.sock")
    with ThreadedVhost([("rec", dev, sock)]) as d:
        fe = FrontEnd(connect(sock))
        try:
            fe.negotiate()
            fe.set_mem_table()
            fe.start_ring(0, size=8)
            d.call(lambda: setattr(dev, "complete_at_once", True))
            buf = fe.alloc.alloc(16)
            fe.rings[0].q.add([], [(buf, 16)], "x")
            fe.kick(0)
            assert [t for t, _ in fe.wait_used(0, 1)] == ["x"]
            # The ring's start drains what arrived before it (scheduled); the kick, at once.
            assert d.call(lambda: list(dev.calls)) == ["notify", "kicked"]
        finally:
            fe.close()


def test_a_queue_with_chains_to_redo_is_never_drained() -> None:
    """block.process_queue stops popping when the queue says it is drained: chains a restart
    left to redo (the inflight record's resubmit list) must keep it popping, whatever the
    avail index says."""
    q = VhostQueue(16, 0)
    assert q.drained()  # nothing read, nothing owed
    q.resubmit = [3, 5]
    assert not q.drained()
    q.resubmit = []
    assert q.drained()
