"""The generic adaptor: IOREQs from any VMM over a Unix socket (docs/generic-ioreq.md).

Xen's request page is kept as it is (ioreq_t slots, READY -> INPROCESS -> IORESP_READY), so
vmmiod/hypervisors/ioreq_slot.py serves both adaptors (here one `slot_server` per vCPU, built at
connect time); Xen's event channels become eventfds and foreign mapping becomes memfds mapped
once at connect time. One VMM at a time; a VMM that goes
away resets every device (`bus.detach_memory()`) and the daemon waits for the next one, or
exits when the config says `on_disconnect: exit`.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmmiod.config import MMIO_WINDOW_SIZE, Config, GenericConfig
from vmmiod.hypervisors.base import Adaptor
from vmmiod.hypervisors.generic import fds as fdcheck
from vmmiod.hypervisors.generic.lines import EVENTFD_ONE, GenericLine
from vmmiod.hypervisors.generic.protocol import (
    IRQ_MODE_EVENTFD,
    IRQ_MODE_LEVEL,
    MAX_MESSAGE,
    MSG_BYE,
    REFUSE_BUSY,
    REFUSE_FD_COUNT,
    REFUSE_IRQS,
    REFUSE_MALFORMED,
    ClientHello,
    ProtocolError,
    Window,
    header,
    pack_refuse,
    pack_server_hello,
    parse_client_hello,
    parse_header,
)
from vmmiod.hypervisors.ioreq_slot import serve_ioreq_slot, slot_server
from vmmiod.memory import MappedMemory
from vmmiod.unixsock import clear_stale_socket

MSG_ACCEPT_BYTES = header(3)
HELLO_TIMEOUT = 10.0  # seconds a connected peer has to send its hello
SCM_MAX_FD = 253  # Linux's limit of fds in one SCM_RIGHTS message
ACCEPT_BACKOFF = 1.0  # seconds without accepting after EMFILE/ENFILE (else a busy loop)


@dataclass
class _Connection:
    sock: socket.socket
    hello: ClientHello
    memory: MappedMemory
    page: mmap.mmap
    page_view: memoryview
    req_fds: list[int]
    resp_fds: list[int]
    fds: list[int] = field(default_factory=list)  # every fd received, closed at disconnect
    readers: list[Callable[[], None]] = field(default_factory=list)  # per vCPU, see _activate


class GenericAdaptor(Adaptor):
    kind = "generic"

    def __init__(self, config: Config, bus: Any, log: Any) -> None:
        super().__init__(bus, log)
        assert isinstance(config.hypervisor, GenericConfig)
        self.config = config
        self.hv: GenericConfig = config.hypervisor
        self.counters = {"connections": 0, "refused": 0, "disconnects": 0, "ioreqs": 0,
                         "ioreqs_unanswered": 0, "interrupts": 0, "interrupts_dropped": 0,
                         "messages_ignored": 0}
        self._lines: dict[int, GenericLine] = {}
        self._listener: socket.socket | None = None
        self._listener_ino: int | None = None
        self._pending: dict[socket.socket, asyncio.TimerHandle] = {}
        self._conn: _Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.hello_timeout = HELLO_TIMEOUT

    # -- Adaptor interface -------------------------------------------------------------------------
    async def prepare(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.finished is None:
            self.finished = self._loop.create_future()

    def interrupt_line(self, irq: int) -> GenericLine:
        line = self._lines.get(irq)
        if line is None:
            line = self._lines[irq] = GenericLine(irq, self.counters)
        return line

    def server_windows(self) -> list[Window]:
        """The windows announced to a VMM: what is on the bus (the config when it cannot say)."""
        out = []
        if hasattr(self.bus, "windows"):
            for base, size, window in self.bus.windows():
                irq = getattr(getattr(window, "irq_line", None), "irq", None)
                if irq is not None:
                    out.append(Window(base, size, irq))
            return out
        for dev in self.config.devices:
            if dev.mmio.base is not None and dev.mmio.irq is not None:
                out.append(Window(dev.mmio.base, MMIO_WINDOW_SIZE, dev.mmio.irq))
        return out

    async def start(self) -> None:
        if self._loop is None:
            await self.prepare()
        assert self._loop is not None
        path = self.hv.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_socket(path, socket.SOCK_SEQPACKET)  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(path))
            os.chmod(path, self.hv.socket_mode)
            sock.listen(8)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._listener = sock
        self._listener_ino = os.stat(path).st_ino
        self._loop.add_reader(sock.fileno(), self._on_accept)
        self.log.info("vmm_listening", socket=str(path), windows=len(self.server_windows()),
                      on_disconnect=self.hv.on_disconnect)

    def quiesce(self) -> None:
        conn = self._conn
        if conn is not None and self._loop is not None:
            for fd in conn.req_fds:  # requests wait in their slots for the next daemon
                self._loop.remove_reader(fd)

    async def stop(self) -> None:
        if self._listener is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                if os.stat(self.hv.socket).st_ino == self._listener_ino:
                    os.unlink(self.hv.socket)
            except OSError:
                pass
        for sock in list(self._pending):
            self._drop_pending(sock)
        if self._conn is not None:
            self._disconnect("daemon_stopping", exit_allowed=False)

    # -- connections -------------------------------------------------------------------------------
    def _on_accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # Out of fds: the listener stays readable, so pause accepting instead of spinning.
            self.log.warning("vmm_accept_failed", error=str(exc))
            fd = self._listener.fileno()
            self._loop.remove_reader(fd)
            self._loop.call_later(ACCEPT_BACKOFF, self._resume_accept)
            return
        sock.setblocking(False)
        # One connection at a time, from accept to close: while one is served or still owes
        # its hello, the next gets REFUSE BUSY as its first and only message.
        if self._conn is not None or self._pending:
            self._refuse(sock, ProtocolError(REFUSE_BUSY, "another VMM is connected" if
                                             self._conn is not None else "another VMM is "
                                             "connected and has not sent its hello yet"))
            return
        try:
            sock.send(pack_server_hello(self.server_windows()))
        except OSError:
            sock.close()
            return
        self._pending[sock] = self._loop.call_later(self.hello_timeout, self._hello_timeout,
                                                    sock)
        self._loop.add_reader(sock.fileno(), self._on_hello, sock)

    def _resume_accept(self) -> None:
        if self._listener is not None and self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._on_accept)

    def _drop_pending(self, sock: socket.socket) -> None:
        timer = self._pending.pop(sock, None)
        if timer is not None:
            timer.cancel()
        if self._loop is not None and sock.fileno() >= 0:
            self._loop.remove_reader(sock.fileno())

    def _hello_timeout(self, sock: socket.socket) -> None:
        self._drop_pending(sock)
        self._refuse(sock, ProtocolError(REFUSE_MALFORMED,
                                         f"no hello within {self.hello_timeout} s"))

    def _refuse(self, sock: socket.socket, err: ProtocolError) -> None:
        self.counters["refused"] += 1
        self.log.warning("vmm_refused", reason=err.reason, message=str(err))
        try:
            sock.send(pack_refuse(err.reason, str(err)))
        except OSError:
            pass
        sock.close()

    def _on_hello(self, sock: socket.socket) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE + 1, SCM_MAX_FD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop_pending(sock)
            self.log.warning("vmm_refused", reason=REFUSE_MALFORMED, message=str(exc))
            sock.close()
            return
        self._drop_pending(sock)
        if not data and not fds:  # the peer left before saying hello
            sock.close()
            return
        try:
            if self._conn is not None:
                raise ProtocolError(REFUSE_BUSY, "another VMM is connected")
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                raise ProtocolError(REFUSE_FD_COUNT if flags & socket.MSG_CTRUNC else
                                    REFUSE_MALFORMED, "hello or its fds were truncated")
            conn = self._build(sock, data, fds)
        except ProtocolError as err:
            fdcheck.close_all(fds)
            self._refuse(sock, err)
            return
        self._activate(conn)

    def _build(self, sock: socket.socket, data: bytes, fds: list[int]) -> _Connection:
        """Check the hello and its fds, map memory. ProtocolError leaves nothing mapped."""
        hello = parse_client_hello(data)
        want = hello.fd_count()
        if len(fds) != want:
            raise ProtocolError(REFUSE_FD_COUNT, f"hello announces {want} fds, {len(fds)} came")
        missing = sorted(set(self._lines) - {i.irq for i in hello.irqs})
        if missing:
            raise ProtocolError(REFUSE_IRQS, f"no line for irq(s) {missing} used by devices")
        n_reg, n_cpu = len(hello.regions), hello.n_vcpus
        page_fd = fds[n_reg]
        req_fds = fds[n_reg + 1:n_reg + 1 + n_cpu]
        resp_fds = fds[n_reg + 1 + n_cpu:n_reg + 1 + 2 * n_cpu]
        line_fds = fds[n_reg + 1 + 2 * n_cpu:]
        for k, fd in enumerate(req_fds):
            fdcheck.check_eventfd(fd, f"vCPU {k} request eventfd")
        for k, fd in enumerate(resp_fds):
            fdcheck.check_eventfd(fd, f"vCPU {k} response eventfd")
        for k, fd in enumerate(line_fds):
            fdcheck.check_eventfd(fd, f"interrupt eventfd {k}")
        page = fdcheck.map_ioreq_page(page_fd)
        try:
            memory = fdcheck.map_regions(hello.regions, fds[:n_reg])
        except BaseException:
            page.close()
            raise
        # The daemon never blocks on its peer: a full eventfd counter or an unread socket makes
        # a write fail with EAGAIN instead (O_NONBLOCK is shared with the VMM; it polls).
        for fd in req_fds + resp_fds + line_fds:
            os.set_blocking(fd, False)
        return _Connection(sock, hello, memory, page, memoryview(page), req_fds, resp_fds,
                           list(fds))

    def _activate(self, conn: _Connection) -> None:
        assert self._loop is not None
        self._conn = conn
        self.counters["connections"] += 1
        it = iter(conn.fds[len(conn.hello.regions) + 1 + 2 * conn.hello.n_vcpus:])
        for spec in conn.hello.irqs:
            line = self._lines.get(spec.irq)
            fd = next(it) if spec.mode == IRQ_MODE_EVENTFD else None
            if line is not None:
                line.bind(fd, conn.sock if spec.mode == IRQ_MODE_LEVEL else None)
        self.bus.attach_memory(conn.memory)
        if self.on_guest is not None:  # resume from the state record (docs/restart.md)
            st = os.fstat(conn.fds[len(conn.hello.regions)])  # the ioreq page: same memfd,
            self.on_guest(f"generic:{st.st_dev}:{st.st_ino}")  # same guest
        conn.readers = [self._request_reader(conn, vcpu) for vcpu in range(len(conn.req_fds))]
        for fd, reader in zip(conn.req_fds, conn.readers):
            self._loop.add_reader(fd, reader)
        self._loop.add_reader(conn.sock.fileno(), self._on_message)
        # A request the previous daemon left READY (or took, INPROCESS, and died) is answered
        # before ACCEPT: after it, the VMM's next requests come through the eventfds.
        for vcpu in range(conn.hello.n_vcpus):
            if serve_ioreq_slot(conn.page_view, vcpu, self.bus, resume=True):
                self.counters["ioreqs"] += 1
                self.counters["ioreqs_resumed"] = self.counters.get("ioreqs_resumed", 0) + 1
                try:
                    os.write(conn.resp_fds[vcpu], EVENTFD_ONE)
                except OSError:
                    pass
        try:
            conn.sock.send(MSG_ACCEPT_BYTES)
        except OSError:
            self._disconnect("send_failed")
            return
        self.log.info("vmm_connected", vcpus=conn.hello.n_vcpus,
                      regions=len(conn.hello.regions),
                      ram_bytes=sum(r.size for r in conn.hello.regions),
                      irqs=[i.irq for i in conn.hello.irqs])

    def _request_reader(self, conn: _Connection, vcpu: int) -> Callable[[], None]:
        """vCPU `vcpu`'s request eventfd reader, with all it needs bound once per connection.

        A wake-up reads the eventfd, serves the slot, writes the response eventfd; once `conn`
        is gone (a wake-up collected in the turn that saw the socket's EOF) it does nothing."""
        req_fd, resp_fd = conn.req_fds[vcpu], conn.resp_fds[vcpu]
        serve = slot_server(conn.page_view, vcpu, self.bus)
        counters = self.counters
        read, write = os.read, os.write

        def on_request() -> None:
            if self._conn is not conn:
                return
            try:
                read(req_fd, 8)
            except (BlockingIOError, InterruptedError):
                return
            counters["ioreqs"] += 1
            if serve():
                try:
                    write(resp_fd, EVENTFD_ONE)
                except OSError:
                    pass
            else:
                # Not READY (spurious kick, or a VMM scribbling the page): nothing to answer.
                counters["ioreqs_unanswered"] += 1

        return on_request

    def _on_message(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            data = conn.sock.recv(MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect("vmm_closed")
            return
        try:
            _, msg_type = parse_header(data)
        except ProtocolError:
            msg_type = -1
        if msg_type == MSG_BYE:
            self._disconnect("vmm_bye")
            return
        n = self.counters["messages_ignored"] = self.counters["messages_ignored"] + 1
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th ...: a chatty VMM cannot flood the log
            self.log.warning("vmm_message_ignored", type=msg_type, length=len(data),
                             occurrences=n)

    def _disconnect(self, why: str, exit_allowed: bool = True) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        self.counters["disconnects"] += 1
        assert self._loop is not None
        for fd in conn.req_fds:
            self._loop.remove_reader(fd)
        self._loop.remove_reader(conn.sock.fileno())
        for line in self._lines.values():
            line.bind(None, None)
        self.bus.detach_memory()  # resets every device; none may keep a view of guest RAM
        if exit_allowed and self.on_guest is not None:
            self.on_guest(None)  # the guest is gone: nothing to resume
        conn.page_view.release()
        conn.page.close()
        conn.memory.close()
        fdcheck.close_all(conn.fds)
        conn.sock.close()
        self.log.info("vmm_disconnected", why=why, ioreqs=self.counters["ioreqs"],
                      next="exit" if self.hv.on_disconnect == "exit" and exit_allowed else "wait")
        if (exit_allowed and self.hv.on_disconnect == "exit" and self.finished is not None
                and not self.finished.done()):
            self.finished.set_result(0)

    @property
    def connected(self) -> bool:
        return self._conn is not None
