"""Bad peers on the generic channel: each is refused with a message, nothing else is disturbed
(no fd kept, nothing mapped, devices untouched, the next VMM served, a connected VMM unaffected)."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.inproc import ThreadedDaemon
from vmmiod.config import BlockConfig, GuestConfig, MmioConfig
from vmmiod.devices.block import BlockDevice
from vmmiod.hypervisors.generic import protocol as proto
from vmmiod.sim.block import VIRTIO_BLK_T_IN, BlockDriver
from vmmiod.sim.virtio_mmio import MAGIC
from vmmiod.sim.vmm import Refused, SimVmm, sealed_memfd

BASE, IRQ = 0x0200_0000, 33
F_SEAL_FUTURE_WRITE = 0x0010  # linux/fcntl.h (Linux 5.1); Python 3.11's fcntl lacks the name
Hello = tuple[proto.ClientHello, list[int]]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ThreadedDaemon]:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    dev = BlockDevice(BlockConfig("vda", MmioConfig(BASE, IRQ), img), GuestConfig("t"))
    with ThreadedDaemon(tmp_path / "vmm.sock", [(dev, BASE, IRQ)]) as td:
        yield td


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def exchange(path: Path, build: Callable[[proto.ServerHello], tuple[bytes, list[int]]]
             ) -> tuple[int, int, str]:
    """Connect, read the server hello, send what `build` makes of it; (type, reason, text)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(str(path))
        payload, fds = build(proto.parse_server_hello(s.recv(proto.MAX_MESSAGE)))
        socket.send_fds(s, [payload], fds) if fds else s.send(payload)
        answer = s.recv(proto.MAX_MESSAGE)
        _, msg_type = proto.parse_header(answer)
        if msg_type != proto.MSG_REFUSE:
            return msg_type, 0, ""
        assert s.recv(proto.MAX_MESSAGE) == b""  # and the daemon hung up
        return (msg_type, *proto.parse_refuse(answer))


def assert_undisturbed(daemon: ThreadedDaemon) -> None:
    assert not daemon.call(lambda: daemon.adaptor.connected)
    assert daemon.call(lambda: daemon.bus.memory) is None
    assert not daemon.call(lambda: daemon.windows[0].device.active)
    with SimVmm() as vmm:  # the next, well-behaved VMM is served
        dev = BlockDriver(vmm, vmm.connect(daemon.socket_path).windows[0])
        dev.start()
        assert dev.request(VIRTIO_BLK_T_IN, 0, length=512).status == 0


def vmm_fds(vmm: SimVmm) -> set[int]:
    return {vmm.ram_fd, vmm.page_fd, *vmm.req_fds, *vmm.resp_fds, *vmm.irq_fds.values()}


def replace_fd(fds: list[int], index: int, new: int) -> list[int]:
    out = list(fds)
    out[index] = new
    return out


def bad_page(size: int) -> Callable[[SimVmm, Hello], tuple[bytes, list[int]]]:
    def make(vmm: SimVmm, h: Hello) -> tuple[bytes, list[int]]:
        return proto.pack_client_hello(h[0]), replace_fd(h[1], 1, sealed_memfd("p", size))
    return make


def unsealed_ram(vmm: SimVmm, h: Hello) -> tuple[bytes, list[int]]:
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, vmm.ram_size)
    return proto.pack_client_hello(h[0]), replace_fd(h[1], 0, fd)


def short_ram(vmm: SimVmm, h: Hello) -> tuple[bytes, list[int]]:
    """The memfd holds less than the region claims: mapping it would SIGBUS later."""
    return proto.pack_client_hello(h[0]), replace_fd(h[1], 0, sealed_memfd("ram", 1 << 20))


def plain_file(size: int, where: str | None) -> int:
    """An unlinked file of `size` bytes in `where`: it could be truncated under the daemon."""
    fd, name = tempfile.mkstemp(dir=where)
    os.unlink(name)
    os.ftruncate(fd, size)
    return fd


def file_as(index: int, where: str | None) -> Callable[[SimVmm, Hello], tuple[bytes, list[int]]]:
    """A regular (or tmpfs) file in place of the RAM memfd (index 0) or the page (1)."""
    def make(vmm: SimVmm, h: Hello) -> tuple[bytes, list[int]]:
        size = vmm.ram_size if index == 0 else proto.IOREQ_PAGE_SIZE
        return proto.pack_client_hello(h[0]), replace_fd(h[1], index, plain_file(size, where))
    return make


def sealed_with(index: int, seals: int) -> Callable[[SimVmm, Hello], tuple[bytes, list[int]]]:
    """RAM (0) or page (1) in a memfd carrying `seals` (F_SEAL_WRITE: cannot be mapped)."""
    def make(vmm: SimVmm, h: Hello) -> tuple[bytes, list[int]]:
        size = vmm.ram_size if index == 0 else proto.IOREQ_PAGE_SIZE
        fd = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return proto.pack_client_hello(h[0]), replace_fd(h[1], index, fd)
    return make


def pipe_as_eventfd(vmm: SimVmm, h: Hello) -> tuple[bytes, list[int]]:
    r, w = os.pipe()
    os.close(w)
    return proto.pack_client_hello(h[0]), replace_fd(h[1], 2, r)


def socket_as_ram(vmm: SimVmm, h: Hello) -> tuple[bytes, list[int]]:
    a, b = socket.socketpair()
    b.close()
    return proto.pack_client_hello(h[0]), replace_fd(h[1], 0, a.detach())


def overlapping_regions(vmm: SimVmm, h: Hello) -> tuple[bytes, list[int]]:
    hello = h[0]
    regions = (proto.RegionSpec(vmm.ram_gpa, 1 << 20), proto.RegionSpec(vmm.ram_gpa + 4096, 4096))
    import dataclasses
    bad = dataclasses.replace(hello, regions=regions)
    return proto.pack_client_hello(bad), [h[1][0], *h[1]]


def missing_irq(vmm: SimVmm, h: Hello) -> tuple[bytes, list[int]]:
    import dataclasses
    bad = dataclasses.replace(h[0], irqs=())
    return proto.pack_client_hello(bad), h[1][:-1]


Make = Callable[[SimVmm, Hello], tuple[bytes, list[int]]]
CASES: dict[str, tuple[Make, int]] = {
    "garbage": (lambda v, h: (b"\x00" * 40, h[1]), proto.REFUSE_MALFORMED),
    "bad_magic": (lambda v, h: (b"XXXX" + proto.pack_client_hello(h[0])[4:], h[1]),
                  proto.REFUSE_MALFORMED),
    "future_version": (lambda v, h: (proto.header(proto.MSG_CLIENT_HELLO, 9)
                                     + proto.pack_client_hello(h[0])[8:], h[1]),
                       proto.REFUSE_VERSION),
    "truncated": (lambda v, h: (proto.pack_client_hello(h[0])[:-3], h[1]),
                  proto.REFUSE_MALFORMED),
    "no_fds": (lambda v, h: (proto.pack_client_hello(h[0]), []), proto.REFUSE_FD_COUNT),
    "one_fd_short": (lambda v, h: (proto.pack_client_hello(h[0]), h[1][:-1]),
                     proto.REFUSE_FD_COUNT),
    "one_fd_extra": (lambda v, h: (proto.pack_client_hello(h[0]), [*h[1], h[1][0]]),
                     proto.REFUSE_FD_COUNT),
    "page_too_small": (bad_page(100), proto.REFUSE_PAGE),
    "page_too_big": (bad_page(8192), proto.REFUSE_PAGE),
    "pipe_as_eventfd": (pipe_as_eventfd, proto.REFUSE_BAD_FD),
    "socket_as_ram": (socket_as_ram, proto.REFUSE_REGIONS),
    "ram_shorter_than_region": (short_ram, proto.REFUSE_REGIONS),
    "unsealed_memfd": (unsealed_ram, proto.REFUSE_REGIONS),
    "overlapping_regions": (overlapping_regions, proto.REFUSE_REGIONS),
    # Files can be truncated by the VMM at any time (SIGBUS in the daemon): memfds only.
    "disk_file_as_ram": (file_as(0, "/var/tmp"), proto.REFUSE_REGIONS),
    "disk_file_as_page": (file_as(1, "/var/tmp"), proto.REFUSE_PAGE),
    "tmpfs_file_as_ram": (file_as(0, "/dev/shm"), proto.REFUSE_REGIONS),
    "tmpfs_file_as_page": (file_as(1, "/dev/shm"), proto.REFUSE_PAGE),
    "unsealed_page": (sealed_with(1, 0), proto.REFUSE_PAGE),
    "write_sealed_ram": (sealed_with(0, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE),
                         proto.REFUSE_REGIONS),
    "write_sealed_page": (sealed_with(1, fcntl.F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE),
                          proto.REFUSE_PAGE),
    "missing_irq_line": (missing_irq, proto.REFUSE_IRQS),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_peer_is_refused(daemon: ThreadedDaemon, case: str) -> None:
    make, reason = CASES[case]
    for where in ("/var/tmp", "/dev/shm"):
        if case.startswith(("disk" if where == "/var/tmp" else "tmpfs") + "_file") \
                and not os.path.isdir(where):
            pytest.skip(f"{where} does not exist on this machine")
    with SimVmm(ram_size=4 << 20) as vmm:
        before = open_fds()
        fds: list[int] = []

        def build(server: proto.ServerHello) -> tuple[bytes, list[int]]:
            payload, sent = make(vmm, vmm.client_hello(server))
            fds.extend(f for f in sent if f not in vmm_fds(vmm))
            return payload, sent

        msg_type, got_reason, text = exchange(daemon.socket_path, build)
        assert (msg_type, got_reason) == (proto.MSG_REFUSE, reason), text
        assert text  # a message saying why
        for fd in set(fds):  # the test's own extra fds (bad pages, pipes)
            os.close(fd)
        assert open_fds() == before + len(vmm.irq_fds)  # the daemon kept none of the fds
    assert daemon.call(lambda: daemon.adaptor.counters["refused"]) >= 1
    assert_undisturbed(daemon)


def test_hugetlbfs_ram_is_refused(daemon: ThreadedDaemon) -> None:
    """A sealed hugetlbfs memfd: the seal still allows punching a hole, and the daemon's next
    touch of that hole with the huge page pool empty would be SIGBUS. Refused by its file
    system, whatever the pool holds today."""
    try:
        fd = os.memfd_create("huge-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    except OSError as exc:
        pytest.skip(f"no hugetlbfs memfds on this kernel: {exc}")
    with SimVmm(ram_size=4 << 20) as vmm:
        try:
            os.ftruncate(fd, vmm.ram_size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)

            def build(server: proto.ServerHello) -> tuple[bytes, list[int]]:
                hello, fds = vmm.client_hello(server)
                return proto.pack_client_hello(hello), replace_fd(fds, 0, fd)

            msg_type, reason, text = exchange(daemon.socket_path, build)
        finally:
            os.close(fd)
    assert (msg_type, reason) == (proto.MSG_REFUSE, proto.REFUSE_REGIONS)
    assert "hugetlbfs" in text
    assert_undisturbed(daemon)


def test_tolerated_seals(daemon: ThreadedDaemon) -> None:
    """F_SEAL_SHRINK alone is enough; every other seal is fine where the mapping still works:
    a read-only region may carry F_SEAL_WRITE (guest ROM)."""
    import dataclasses

    with SimVmm(ram_size=4 << 20) as vmm:
        rom = os.memfd_create("rom", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        ram = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(rom, 1 << 20)
            fcntl.fcntl(rom, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            os.ftruncate(ram, vmm.ram_size)
            fcntl.fcntl(ram, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            os.close(vmm.ram_fd)
            vmm.ram_fd = ram  # the sim's RAM mapping is of the old fd: same size, unused here

            def client_hello(server: proto.ServerHello) -> tuple[proto.ClientHello, list[int]]:
                hello, fds = SimVmm.client_hello(vmm, server)
                regions = (*hello.regions, proto.RegionSpec(0x1000_0000, 1 << 20, 0, True))
                return dataclasses.replace(hello, regions=regions), [fds[0], rom, *fds[1:]]

            vmm.client_hello = client_hello  # type: ignore[method-assign]
            vmm.connect(daemon.socket_path)
            assert vmm.read(BASE) == MAGIC
            assert daemon.call(lambda: daemon.adaptor.connected)
        finally:
            os.close(rom)


def test_too_many_fds_for_one_message(daemon: ThreadedDaemon) -> None:
    """More fds than SCM_MAX_FD (253): the kernel truncates; the daemon refuses."""
    with SimVmm(vcpus=127) as vmm, pytest.raises((Refused, OSError)):
        vmm.connect(daemon.socket_path)
    assert_undisturbed(daemon)


def test_second_vmm_is_refused_while_one_is_served(daemon: ThreadedDaemon) -> None:
    with SimVmm() as first:
        dev = BlockDriver(first, first.connect(daemon.socket_path).windows[0])
        dev.start()
        with SimVmm() as second:
            with pytest.raises(Refused) as exc:
                second.connect(daemon.socket_path)
            assert exc.value.reason == proto.REFUSE_BUSY
        # The first VMM never noticed.
        assert dev.request(VIRTIO_BLK_T_IN, 0, length=4096).status == 0
        assert first.read(BASE) == MAGIC


def test_silent_peer_times_out(daemon: ThreadedDaemon) -> None:
    daemon.adaptor.hello_timeout = 0.2
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(str(daemon.socket_path))
        proto.parse_server_hello(s.recv(proto.MAX_MESSAGE))
        answer = s.recv(proto.MAX_MESSAGE)  # says nothing; the daemon gives up on it
        assert proto.parse_header(answer)[1] == proto.MSG_REFUSE
        assert "no hello" in proto.parse_refuse(answer)[1]
    assert_undisturbed(daemon)


def test_busy_while_a_peer_is_silent(daemon: ThreadedDaemon) -> None:
    """One connection at a time from accept to close: while the first says nothing yet, the
    second gets REFUSE BUSY as its first message (it used to get SERVER_HELLO, then REFUSE 9
    after its hello); the first is still served, and after it leaves the next one is."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as first:
        first.settimeout(5)
        first.connect(str(daemon.socket_path))
        server = proto.parse_server_hello(first.recv(proto.MAX_MESSAGE))
        for _ in range(3):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as loser:
                loser.settimeout(5)
                loser.connect(str(daemon.socket_path))
                answer = loser.recv(proto.MAX_MESSAGE)
                assert proto.parse_header(answer)[1] == proto.MSG_REFUSE
                assert proto.parse_refuse(answer)[0] == proto.REFUSE_BUSY
                assert loser.recv(proto.MAX_MESSAGE) == b""
        with SimVmm() as vmm:  # the silent one now says hello: it is served
            hello, fds = vmm.client_hello(server)
            socket.send_fds(first, [proto.pack_client_hello(hello)], fds)
            assert proto.parse_header(first.recv(proto.MAX_MESSAGE))[1] == proto.MSG_ACCEPT
            first.send(proto.header(proto.MSG_BYE))
            assert first.recv(proto.MAX_MESSAGE) == b""
    deadline = time.monotonic() + 5
    while daemon.call(lambda: daemon.adaptor.connected) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_undisturbed(daemon)


def test_peer_scribbling_on_the_page_does_not_hurt(daemon: ThreadedDaemon) -> None:
    """Spurious kicks and garbage slots: answered or ignored, never a crash."""
    with SimVmm(vcpus=2) as vmm:
        vmm.connect(daemon.socket_path)
        vmm.page[32:64] = b"\xff" * 32  # vCPU 1: state 15, type 255, size 2**32-1 ...
        os.write(vmm.req_fds[1], (1).to_bytes(8, "little"))
        os.write(vmm.req_fds[0], (1).to_bytes(8, "little"))  # kick with no request: NONE
        time.sleep(0.1)
        assert vmm.read(BASE) == MAGIC
        assert daemon.call(lambda: daemon.adaptor.counters["ioreqs_unanswered"]) == 2
        assert isinstance(vmm.page, mmap.mmap)
