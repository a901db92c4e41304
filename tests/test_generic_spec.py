"""The answers docs/generic-ioreq.md gives a VMM author, checked where they were doubtful: the
state byte, messages after ACCEPT, a READY slot at connect, access sizes, extra and mixed-mode
lines, and which refusal wins when a hello breaks several rules."""

from __future__ import annotations

import dataclasses
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.inproc import ThreadedDaemon
from tests.test_generic_badpeer import BASE, IRQ, exchange
from vmmiod.config import BlockConfig, GuestConfig, MmioConfig
from vmmiod.devices.block import BlockDevice
from vmmiod.hypervisors.generic import protocol as proto
from vmmiod.sim.block import VIRTIO_BLK_T_IN, BlockDriver
from vmmiod.sim.virtio_mmio import MAGIC
from vmmiod.sim.vmm import SimVmm

SLOT = struct.Struct("<QQIIIHBB")  # addr, data, count, size, vp_eport, pad, state byte, type
ONE = (1).to_bytes(8, "little")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ThreadedDaemon]:
    """One block device on a 1 MiB image at BASE, irq IRQ."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    dev = BlockDevice(BlockConfig("vda", MmioConfig(BASE, IRQ), img), GuestConfig("t"))
    with ThreadedDaemon(tmp_path / "vmm.sock", [(dev, BASE, IRQ)]) as td:
        yield td


def raw_ioreq(vmm: SimVmm, addr: int, size: int, state_byte: int, data: int = 0,
              vp_eport: int = 0x1234_5678, pad: int = 0xBEEF, count: int = 1,
              type_: int = 1) -> tuple[int, ...]:
    """Fill vCPU 0's slot by hand (state byte as given), kick, wait; the slot afterwards."""
    SLOT.pack_into(vmm.page, 0, addr, data, count, size, vp_eport, pad, state_byte, type_)
    os.write(vmm.req_fds[0], ONE)
    vmm._wait_response(0)
    return SLOT.unpack_from(vmm.page, 0)


def test_state_byte_is_stored_alone_and_keeps_the_other_bits(daemon: ThreadedDaemon) -> None:
    """Bits 0-3 state, 4 data_is_ptr, 5 dir, 6 df, 7 reserved: the daemon changes only the
    state nibble; it writes `data` for a read (zero-extended) and nothing else of the slot."""
    with SimVmm() as vmm:
        vmm.connect(daemon.socket_path)
        out = raw_ioreq(vmm, BASE, 4, 0x80 | 0x20 | 1, data=0xFFFF_FFFF_FFFF_FFFF)  # read
        assert out == (BASE, MAGIC, 1, 4, 0x1234_5678, 0xBEEF, 0x80 | 0x20 | 3, 1)
        out = raw_ioreq(vmm, BASE + 0x070, 4, 0x80 | 1, data=0xAB00_0000_0000_0000)  # write
        assert out == (BASE + 0x070, 0xAB00_0000_0000_0000, 1, 4, 0x1234_5678, 0xBEEF,
                       0x80 | 3, 1)
        out = raw_ioreq(vmm, BASE, 2, 0x20 | 1, data=0x5555)  # 2-byte register read: 0
        assert out[1] == 0 and out[6] == 0x20 | 3


def test_messages_after_accept_are_ignored_and_their_fds_closed(
        daemon: ThreadedDaemon) -> None:
    """A second hello (with fds), an unknown type, garbage and an oversized packet after
    ACCEPT: ignored, counted; fds sent with them are closed by the kernel, not kept."""
    with SimVmm() as vmm:
        server = vmm.connect(daemon.socket_path)
        assert vmm.sock is not None
        r, w = os.pipe()
        hello, _ = vmm.client_hello(server)
        socket.send_fds(vmm.sock, [proto.pack_client_hello(hello)], [w])
        os.close(w)
        vmm.sock.send(proto.header(77) + b"x" * 10)
        vmm.sock.send(b"garbage")
        vmm.sock.send(proto.header(proto.MSG_CLIENT_HELLO) + bytes(20000))
        p = select.poll()
        p.register(r, select.POLLIN)
        assert p.poll(5000), "the daemon kept the write end of the pipe"
        assert os.read(r, 1) == b""  # EOF: no process holds the write end any more
        os.close(r)
        assert vmm.read(BASE) == MAGIC  # the session goes on, unchanged
        deadline = time.monotonic() + 5  # the socket and the eventfds are separate sources
        while daemon.call(lambda: daemon.adaptor.counters.get("messages_ignored", 0)) < 4 \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        assert daemon.call(lambda: daemon.adaptor.counters["messages_ignored"]) == 4
        assert vmm.read(BASE) == MAGIC
        assert daemon.call(lambda: daemon.adaptor.counters["connections"]) == 1


def test_ready_slot_kicked_before_connect_is_served_at_connect(
        daemon: ThreadedDaemon) -> None:
    """The daemon serves a slot when its request eventfd is readable, from ACCEPT on: a READY
    slot whose counter is non-zero when the VMM connects is answered at once."""
    with SimVmm() as vmm:
        SLOT.pack_into(vmm.page, 0, BASE, 0, 1, 4, 0, 0, 0x20 | 1, 1)
        os.write(vmm.req_fds[0], ONE)
        vmm.connect(daemon.socket_path)
        vmm._wait_response(0)
        assert SLOT.unpack_from(vmm.page, 0)[1] == MAGIC
        assert vmm.page[30] & 0xF == 3


def test_semaphore_request_eventfd_works(daemon: ThreadedDaemon) -> None:
    """EFD_SEMAPHORE: each read takes 1; a second kick of one access is counted, not answered."""
    with SimVmm() as vmm:
        os.close(vmm.req_fds[0])
        vmm.req_fds[0] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
        vmm.connect(daemon.socket_path)
        SLOT.pack_into(vmm.page, 0, BASE, 0, 1, 4, 0, 0, 0x20 | 1, 1)
        os.write(vmm.req_fds[0], (2).to_bytes(8, "little"))  # two kicks for one access
        vmm._wait_response(0)
        assert SLOT.unpack_from(vmm.page, 0)[1] == MAGIC
        vmm.page[30] = 0
        deadline = time.monotonic() + 5
        while daemon.call(lambda: daemon.adaptor.counters["ioreqs_unanswered"]) < 1 \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        assert daemon.call(lambda: daemon.adaptor.counters["ioreqs_unanswered"]) == 1
        assert vmm.read(BASE) == MAGIC  # and the next access is served as usual


@pytest.mark.parametrize("offset, size, expected", [
    (0x000, 4, MAGIC),
    (0x000, 1, 0),  # registers: 4 bytes, aligned, or ignored (reads 0)
    (0x000, 8, 0),
    (0x002, 4, 0),  # unaligned: no register there
    (0x100, 8, 2048),  # block config: capacity, 8 bytes at once (1 MiB image)
    (0x104, 1, 0),  # config: any size 1/2/4/8 at any offset
    (0x100 + 60, 4, 0),  # past the block config's 60 bytes: 0
    (0x100 + 58, 4, 0),  # straddling its end: 0 for the whole access
    (0x1FC, 8, 0xFFFF_FFFF_FFFF_FFFF),  # spans the window's end: unclaimed, all ones
    (0x000, 3, 0xFF_FFFF),  # a size other than 1, 2, 4, 8: all ones of that size
    (0x200, 4, 0xFFFF_FFFF),  # no window
    (0x000, 0, 0),  # size 0: all ones of 0 bytes
    (0x000, 16, 0xFFFF_FFFF_FFFF_FFFF),  # above 8: all ones of 8 bytes
])
def test_register_access_sizes(daemon: ThreadedDaemon, offset: int, size: int,
                               expected: int) -> None:
    with SimVmm() as vmm:
        vmm.connect(daemon.socket_path)
        out = raw_ioreq(vmm, BASE + offset, size, 0x20 | 1)
        assert out[1] == expected


@pytest.mark.parametrize("type_, count, state_byte, expected", [
    (1, 1, 0x40 | 0x20 | 1, MAGIC),  # COPY with df set, count 1: df is ignored
    (1, 2, 0x20 | 1, 0xFFFF_FFFF),  # rep
    (1, 1, 0x10 | 0x20 | 1, 0xFFFF_FFFF),  # data_is_ptr
    (0, 1, 0x20 | 1, 0xFFFF_FFFF),  # PIO
    (2, 1, 0x20 | 1, 0xFFFF_FFFF),  # PCI config
    (99, 1, 0x20 | 1, 0xFFFF_FFFF),  # unknown type
    (8, 1, 0x20 | 1, 0),  # INVALIDATE
])
def test_request_types(daemon: ThreadedDaemon, type_: int, count: int, state_byte: int,
                       expected: int) -> None:
    """Only COPY, count 1, not a pointer reaches the window; everything is answered."""
    with SimVmm() as vmm:
        vmm.connect(daemon.socket_path)
        out = raw_ioreq(vmm, BASE, 4, state_byte, count=count, type_=type_)
        assert out[1] == expected
        assert out[6] == (state_byte & 0xF0) | 3


def test_extra_and_mixed_mode_lines_are_accepted(daemon: ThreadedDaemon) -> None:
    """A line no device uses is accepted and never written; modes may differ per line."""
    with SimVmm(irq_mode=proto.IRQ_MODE_LEVEL) as vmm:
        extra = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            def client_hello(server: proto.ServerHello) -> tuple[proto.ClientHello, list[int]]:
                hello, fds = SimVmm.client_hello(vmm, server)
                irqs = (*hello.irqs, proto.IrqSpec(IRQ + 7, proto.IRQ_MODE_EVENTFD))
                return dataclasses.replace(hello, irqs=irqs), [*fds, extra]

            vmm.client_hello = client_hello  # type: ignore[method-assign]
            dev = BlockDriver(vmm, vmm.connect(daemon.socket_path).windows[0])
            dev.start()
            assert dev.request(VIRTIO_BLK_T_IN, 0, length=512).status == 0  # via IRQ_LEVEL
            assert daemon.call(lambda: daemon.adaptor._lines[IRQ].sock is not None)  # LEVEL
            time.sleep(0.05)
            with pytest.raises(BlockingIOError):
                os.read(extra, 8)  # never written
        finally:
            os.close(extra)


def _hello_with(vmm: SimVmm, server: proto.ServerHello, *, version: int = proto.VERSION,
                n_vcpus: int | None = None, drop_fd: bool = False,
                bad_eventfd: bool = False) -> tuple[bytes, list[int]]:
    hello, fds = vmm.client_hello(server)
    if n_vcpus is not None:
        hello = dataclasses.replace(hello, n_vcpus=n_vcpus)
    if bad_eventfd:
        fds = [fds[0], fds[1], fds[0], *fds[3:]]  # RAM's memfd as vCPU 0's request eventfd
    if drop_fd:
        fds = fds[:-1]
    raw = proto.pack_client_hello(hello)
    return proto.header(proto.MSG_CLIENT_HELLO, version) + raw[proto.HEADER.size:], fds


@pytest.mark.parametrize("faults, winner", [
    ({"version": 9, "n_vcpus": 0, "drop_fd": True}, proto.REFUSE_VERSION),
    ({"n_vcpus": 0, "drop_fd": True}, proto.REFUSE_VCPUS),
    ({"drop_fd": True, "bad_eventfd": True}, proto.REFUSE_FD_COUNT),
])
def test_first_failed_check_wins(daemon: ThreadedDaemon, faults: dict[str, Any],
                                 winner: int) -> None:
    with SimVmm(ram_size=4 << 20) as vmm:
        msg_type, reason, _ = exchange(daemon.socket_path,
                                       lambda server: _hello_with(vmm, server, **faults))
    assert (msg_type, reason) == (proto.MSG_REFUSE, winner)
