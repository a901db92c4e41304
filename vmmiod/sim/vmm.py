"""The VMM side of the generic IOREQ channel, as the simulated guest's "hypervisor".

It owns what a real VMM owns: guest RAM in a sealed memfd, the shared page of ioreq_t slots, a
"request ready" and a "response ready" eventfd per vCPU and an eventfd per interrupt line. A
vCPU access to a virtio-mmio window becomes an IOREQ exactly as Xen forwards it on Arm (type
COPY, count 1, data not a pointer) and the calling thread blocks until the daemon answers.

How the sim waits (documented in docs/generic-ioreq.md): in its own thread, with `poll()` on the
response eventfd and the socket (a daemon that dies is noticed at once, a daemon that hangs after
`timeout` seconds), then `read()`. No event loop: the guest side is plain blocking code, the way
a vCPU is, and the daemon usually runs in another process.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import struct
import time
from pathlib import Path
from typing import Self

from vmmiod import barrier
from vmmiod.hypervisors.generic import protocol as proto
from vmmiod.memory import MappedMemory
from vmmiod.sim.vring import Allocator

IOREQ = struct.Struct("<QQIIIHBB")  # addr, data, count, size, vp_eport, pad, state|flags, type
IOREQ_STATE_OFF = 30
STATE_NONE, STATE_READY, STATE_INPROCESS, STATE_IORESP_READY = 0, 1, 2, 3
IOREQ_TYPE_COPY = 1
IOREQ_DIR_READ = 1 << 5  # in the state byte: bits 0-3 state, 4 data_is_ptr, 5 dir, 6 df
EVENTFD_ONE = (1).to_bytes(8, "little")
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

DEFAULT_RAM_GPA = 0x4000_0000  # Arm guest RAM bank 0, as under Xen
DEFAULT_RAM_SIZE = 64 << 20


class SimError(Exception):
    """The daemon misbehaved, went away or did not answer in time."""


class Refused(SimError):
    """The daemon refused our hello."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(f"refused ({reason}): {message}")
        self.reason = reason
        self.message = message


def sealed_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


class SimVmm:
    """A VMM with `vcpus` vCPUs and one RAM region; connect() it to a daemon's socket."""

    def __init__(self, ram_size: int = DEFAULT_RAM_SIZE, ram_gpa: int = DEFAULT_RAM_GPA,
                 vcpus: int = 1, irq_mode: int = proto.IRQ_MODE_EVENTFD,
                 timeout: float = 10.0, rejoin: float = 0.0) -> None:
        self.ram_gpa, self.ram_size = ram_gpa, ram_size
        self.timeout = timeout
        # A daemon that goes away: with `rejoin` seconds, wait that long for the next one and
        # reconnect with the same RAM and ioreq page, the vCPU still waiting on its request
        # (what a VMM does for a restartable device model, docs/restart.md); 0: SimError.
        self.rejoin = rejoin
        self.rejoins: list[tuple[float, float]] = []  # (daemon gone, connected again), monotonic
        self._path: str | Path | None = None
        self.irq_mode = irq_mode
        self.ram_fd = sealed_memfd("sim-guest-ram", ram_size)
        self.memory = MappedMemory()
        self.memory.map_fd(ram_gpa, ram_size, self.ram_fd)
        self.alloc = Allocator(ram_gpa, ram_size)
        self.page_fd = sealed_memfd("sim-ioreq-page", proto.IOREQ_PAGE_SIZE)
        self.page = mmap.mmap(self.page_fd, proto.IOREQ_PAGE_SIZE, flags=mmap.MAP_SHARED)
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        self.req_fds = [os.eventfd(0, flags) for _ in range(vcpus)]
        self.resp_fds = [os.eventfd(0, flags) for _ in range(vcpus)]
        self.irq_fds: dict[int, int] = {}
        self.irq_level: dict[int, bool] = {}
        self.sock: socket.socket | None = None
        self.server: proto.ServerHello | None = None
        self.ioreqs = 0
        self._polls: list[select.poll] = []

    # -- connection --------------------------------------------------------------------------------
    def connect(self, path: str | Path, wait: float = 0.0) -> proto.ServerHello:
        """Connect, hand over RAM, page and eventfds; returns the daemon's hello (its windows)."""
        self._path = path
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        sock.settimeout(self.timeout)
        try:
            first = self._recv(sock)
            if proto.parse_header(first)[1] == proto.MSG_REFUSE:  # busy: no hello at all
                raise Refused(*proto.parse_refuse(first))
            server = proto.parse_server_hello(first)
            hello, fds = self.client_hello(server)
            socket.send_fds(sock, [proto.pack_client_hello(hello)], fds)
            self._expect_accept(sock)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)  # from here on every wait is a poll() with its own timeout
        self.sock, self.server = sock, server
        self._polls = []
        for fd in self.resp_fds:
            p = select.poll()
            p.register(fd, select.POLLIN)
            p.register(sock.fileno(), select.POLLIN if self.irq_mode == proto.IRQ_MODE_LEVEL
                       else 0)  # 0: only HUP/ERR (the daemon went away)
            self._polls.append(p)
        return server

    def client_hello(self, server: proto.ServerHello) -> tuple[proto.ClientHello, list[int]]:
        """The hello this VMM sends, with its fds in protocol order (tests alter it)."""
        for w in server.windows:
            if w.irq not in self.irq_level:
                self.irq_level[w.irq] = False
                if self.irq_mode == proto.IRQ_MODE_EVENTFD and w.irq not in self.irq_fds:
                    self.irq_fds[w.irq] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        irqs = tuple(proto.IrqSpec(irq, self.irq_mode) for irq in self.irq_level)
        hello = proto.ClientHello(proto.VERSION, len(self.req_fds),
                                  (proto.RegionSpec(self.ram_gpa, self.ram_size),), irqs)
        fds = [self.ram_fd, self.page_fd, *self.req_fds, *self.resp_fds, *self.irq_fds.values()]
        return hello, fds

    def _recv(self, sock: socket.socket) -> bytes:
        try:
            data = sock.recv(proto.MAX_MESSAGE)
        except TimeoutError as exc:
            raise SimError("the daemon did not answer the handshake") from exc
        if not data:
            raise SimError("the daemon closed the connection")
        return data

    def _expect_accept(self, sock: socket.socket) -> None:
        data = self._recv(sock)
        _, msg_type = proto.parse_header(data)
        if msg_type == proto.MSG_REFUSE:
            raise Refused(*proto.parse_refuse(data))
        if msg_type != proto.MSG_ACCEPT:
            raise SimError(f"expected ACCEPT, got message type {msg_type}")

    def disconnect(self, bye: bool = True) -> None:
        if self.sock is None:
            return
        if bye:
            try:
                self.sock.send(proto.header(proto.MSG_BYE))
            except OSError:
                pass
        self.sock.close()
        self.sock = None
        for fd in [*self.irq_fds.values(), *self.resp_fds]:
            try:
                os.read(fd, 8)  # stale counts from the last connection
            except OSError:
                pass
        self.page[:] = bytes(proto.IOREQ_PAGE_SIZE)

    def close(self) -> None:
        self.disconnect()
        for fd in [self.ram_fd, self.page_fd, *self.req_fds, *self.resp_fds,
                   *self.irq_fds.values()]:
            os.close(fd)
        self.irq_fds.clear()
        self.memory.close()
        self.page.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- vCPU accesses -----------------------------------------------------------------------------
    def mmio(self, addr: int, size: int, value: int = 0, *, read: bool, vcpu: int = 0) -> int:
        """One IOREQ on `vcpu`'s slot; blocks until the daemon completes it."""
        page, off = self.page, proto.IOREQ_SIZE * vcpu
        dirbit = IOREQ_DIR_READ if read else 0
        IOREQ.pack_into(page, off, addr, 0 if read else value & ((1 << 8 * size) - 1), 1, size,
                        0, 0, STATE_NONE | dirbit, IOREQ_TYPE_COPY)
        barrier.wmb()  # the request before its state
        page[off + IOREQ_STATE_OFF] = STATE_READY | dirbit
        os.write(self.req_fds[vcpu], EVENTFD_ONE)
        self._wait_response(vcpu)
        barrier.rmb()
        state = page[off + IOREQ_STATE_OFF] & 0xF
        if state != STATE_IORESP_READY:
            raise SimError(f"vCPU {vcpu}: woken with ioreq state {state}, not IORESP_READY")
        data: int = IOREQ.unpack_from(page, off)[1]
        page[off + IOREQ_STATE_OFF] = STATE_NONE  # the hypervisor's step: the vCPU resumes
        self.ioreqs += 1
        return data & ((1 << 8 * size) - 1) if read else 0

    def _wait_response(self, vcpu: int) -> None:
        fd = self.resp_fds[vcpu]
        while True:
            try:
                os.read(fd, 8)
                return
            except BlockingIOError:
                pass
            if self.sock is None:
                raise SimError("not connected")
            events = self._polls[vcpu].poll(self.timeout * 1000)
            if not events:
                raise SimError(f"vCPU {vcpu}: no IOREQ response within {self.timeout} s")
            for efd, ev in events:
                if efd == self.sock.fileno():
                    if ev & (select.POLLHUP | select.POLLERR):
                        self._daemon_gone()
                        break
                    self._drain_messages()

    def _daemon_gone(self) -> None:
        """The daemon closed the connection: SimError, or (rejoin) wait for the next one."""
        if not self.rejoin or self._path is None:
            raise SimError("the daemon closed the connection")
        gone = time.monotonic()
        assert self.sock is not None
        self.sock.close()
        self.sock = None
        deadline = gone + self.rejoin
        while True:  # the next daemon may itself go away during the handshake: try again
            try:
                self.connect(self._path, wait=max(0.0, deadline - time.monotonic()))
                break
            except Refused:
                raise
            except (OSError, SimError) as exc:
                if time.monotonic() >= deadline:
                    raise SimError(f"the daemon closed the connection; no daemon to rejoin: "
                                   f"{exc}") from exc
                time.sleep(0.01)
        self.rejoins.append((gone, time.monotonic()))

    def read(self, addr: int, size: int = 4, vcpu: int = 0) -> int:
        return self.mmio(addr, size, read=True, vcpu=vcpu)

    def write(self, addr: int, value: int, size: int = 4, vcpu: int = 0) -> None:
        self.mmio(addr, size, value, read=False, vcpu=vcpu)

    # -- interrupts --------------------------------------------------------------------------------
    def _drain_messages(self) -> None:
        """Level-mode interrupt messages from the daemon."""
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(proto.MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if not data:
                raise SimError("the daemon closed the connection")
            _, msg_type = proto.parse_header(data)
            if msg_type == proto.MSG_IRQ_LEVEL:
                irq, level = proto.IRQ_LEVEL.unpack_from(data, proto.HEADER.size)
                self.irq_level[irq] = bool(level)

    def wait_irq(self, irq: int, timeout: float | None = None) -> bool:
        """Wait until line `irq` fires (edge consumed) or is high (level); False on timeout."""
        if self.sock is None:
            raise SimError("not connected")
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        fd = self.irq_fds.get(irq)
        p = self._irq_poll(fd)
        while True:
            if fd is not None:
                try:
                    os.read(fd, 8)
                    return True
                except BlockingIOError:
                    pass
            else:
                self._drain_messages()
                if self.irq_level.get(irq):
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for efd, ev in p.poll(left * 1000):
                if efd == self.sock.fileno():
                    if ev & (select.POLLHUP | select.POLLERR):
                        self._daemon_gone()
                        p = self._irq_poll(fd)
                        break
                    self._drain_messages()

    def _irq_poll(self, fd: int | None) -> select.poll:
        assert self.sock is not None
        p = select.poll()
        if fd is not None:
            p.register(fd, select.POLLIN)
        p.register(self.sock.fileno(), select.POLLIN)
        return p
