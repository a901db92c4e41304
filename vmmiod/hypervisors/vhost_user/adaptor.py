"""The vhost-user adaptor: one Unix stream socket per device, the daemon as back-end.

Each device has an endpoint: the daemon listens on its socket (QEMU connects with
`-chardev socket,path=...,reconnect=N`) or connects to one the VMM listens on, retrying every
`reconnect` seconds. One front-end per device at a time; each connection has its own Session
(session.py), so a front-end that breaks the protocol loses its own connection (logged as
`vhost_user_protocol_violation`) and every other device keeps serving. Framing is done here:
the 12-byte header, then exactly `size` bytes of payload, never reading into the next message,
so the fds that arrive belong to the message being read (they travel with its first byte).
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

from vmmiod.hypervisors.base import Adaptor
from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.hypervisors.vhost_user.device import VhostDevice
from vmmiod.hypervisors.vhost_user.session import Session
from vmmiod.hypervisors.vhost_user.vring import close_quietly
from vmmiod.unixsock import clear_stale_socket

MESSAGES_PER_WAKEUP = 64  # then yield to the loop: one chatty front-end cannot starve others
# A front-end speaks first, at once (QEMU sends GET_FEATURES as it connects): a connection
# silent this long is closed, so it cannot hold the device's one slot against the real VMM.
FIRST_MESSAGE_TIMEOUT = 10.0
COUNTERS = ("connections", "disconnects", "violations", "internal_errors", "refused", "messages",
            "kicks", "calls", "calls_dropped", "device_faults", "config_changes_unsent",
            "memory_regions", "connect_failures")


class Endpoint:
    """One device's socket, its connection (at most one) and that connection's session."""

    def __init__(self, adaptor: VhostUserAdaptor, dev_id: str, device: VhostDevice,
                 path: Path, connect: bool, offer_config: bool = True) -> None:
        self.adaptor = adaptor
        self.dev_id = dev_id
        self.device = device
        self.path = path
        self.connect = connect
        self.offer_config = offer_config
        self.log = adaptor.log.bind(device=dev_id, socket=str(path))
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.violation_reasons: dict[str, int] = {}  # reason -> count (tests, diagnostics)
        self.listener: socket.socket | None = None
        self.listener_ino: int | None = None
        self.sock: socket.socket | None = None
        self.session: Session | None = None
        self.retry: asyncio.TimerHandle | None = None
        self.first_message_timeout = FIRST_MESSAGE_TIMEOUT
        self._silence: asyncio.TimerHandle | None = None
        self._messages_at_attach = 0
        self._attempts = 0  # connection attempts since the last success (log throttling)
        self._buf = bytearray()
        self._fds: list[int] = []
        self._hdr: w.Header | None = None
        self._watched: set[int] = set()
        self.loop = asyncio.get_running_loop()
        self.stopped = False

    # -- SessionIO ---------------------------------------------------------------------------------
    def watch(self, fd: int, callback: Any) -> None:
        self.loop.add_reader(fd, callback)
        self._watched.add(fd)

    def unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.discard(fd)
            self.loop.remove_reader(fd)

    # -- sockets -----------------------------------------------------------------------------------
    def open(self, mode: int) -> None:
        if self.connect:
            self._try_connect()
            return
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_socket(path)  # a stale socket of an earlier run (or a killed predecessor)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(path))
            os.chmod(path, mode)
            sock.listen(4)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.listener = sock
        self.listener_ino = os.stat(path).st_ino
        self.loop.add_reader(sock.fileno(), self._on_accept)
        self.log.info("vhost_user_listening")

    def _on_accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of fds: pause accepting rather than spin
            self.log.warning("vhost_user_accept_failed", error=str(exc))
            self.loop.remove_reader(self.listener.fileno())
            self.retry = self.loop.call_later(self.adaptor.reconnect, self._resume_accept)
            return
        if self.sock is not None:
            self.counters["refused"] += 1
            self.log.warning("vhost_user_refused", reason="a front-end is already connected")
            sock.close()
            return
        self._attach(sock)

    def _resume_accept(self) -> None:
        if self.listener is not None and not self.stopped:
            self.loop.add_reader(self.listener.fileno(), self._on_accept)

    def _try_connect(self) -> None:
        self.retry = None
        if self.stopped or self.sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            self.counters["connect_failures"] += 1
            self._attempts += 1
            n = self._attempts
            if n & (n - 1) == 0:  # 1st, 2nd, 4th...: a VMM that never comes does not flood
                self.log.info("vhost_user_connect_failed", error=exc.strerror, attempts=n)
            self.retry = self.loop.call_later(self.adaptor.reconnect, self._try_connect)
            return
        self._attempts = 0
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf.clear()
        self._hdr = None
        self.session = Session(self.device, self, self.log, self.counters, self.offer_config)
        self._messages_at_attach = self.counters["messages"]
        self.counters["connections"] += 1
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self._silence = self.loop.call_later(self.first_message_timeout, self._silent, sock)
        self.log.info("vhost_user_connected")

    def _silent(self, sock: socket.socket) -> None:
        self._silence = None
        if self.sock is sock and self.counters["messages"] == self._messages_at_attach:
            self.counters["violations"] += 1
            self.violation_reasons["silent"] = self.violation_reasons.get("silent", 0) + 1
            self.log.warning("vhost_user_protocol_violation", reason="silent", request=None,
                             message=f"no message within {self.first_message_timeout} s of "
                                     "connecting")
            self.disconnect("protocol_violation")

    # -- messages ----------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        for _ in range(MESSAGES_PER_WAKEUP):
            if self.sock is None:
                return
            try:
                if not self._read_one():
                    return
            except w.MessageError as exc:
                self.counters["violations"] += 1
                self.violation_reasons[exc.reason] = self.violation_reasons.get(exc.reason, 0) + 1
                self.log.warning("vhost_user_protocol_violation", reason=exc.reason,
                                 message=str(exc),
                                 request=self._hdr.name if self._hdr else None)
                self.disconnect("protocol_violation")
                return
            except Exception as exc:  # a bug: this connection goes, the daemon stays
                self.counters["internal_errors"] += 1
                self.log.exception("vhost_user_error", error=repr(exc))
                self.disconnect("internal_error")
                return

    def _read_one(self) -> bool:
        """Read towards the current message; True when one was handled (try another)."""
        sock = self.sock
        assert sock is not None
        want = w.HEADER_SIZE if self._hdr is None else self._hdr.size
        if len(self._buf) < want:
            try:
                data, fds, flags, _ = socket.recv_fds(sock, want - len(self._buf), w.MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                self.disconnect(f"receive failed: {exc.strerror}")
                return False
            self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC or len(self._fds) > w.MAX_FDS:
                # (a peer sending its message a byte at a time, fds with every byte, must not
                # make the daemon hold thousands of fds)
                raise w.MessageError("too_many_fds", f"more than {w.MAX_FDS} fds in a message")
            if not data:
                self.disconnect("front_end_closed")
                return False
            self._buf += data
            if len(self._buf) < want:
                return True
        if self._hdr is None:
            self._hdr = w.parse_header(bytes(self._buf))
            self._buf.clear()
            if self._hdr.size:
                return True
        hdr, payload, fds = self._hdr, bytes(self._buf), self._fds
        self._hdr, self._fds = None, []
        self._buf.clear()
        self.counters["messages"] += 1
        assert self.session is not None
        self._hdr = hdr  # named in a violation's log event
        replies = self.session.handle(hdr, payload, fds)
        self._hdr = None
        for data, out_fds in replies:
            try:
                if out_fds:
                    socket.send_fds(sock, [data], out_fds)
                else:
                    sock.send(data)
            except OSError as exc:
                self.disconnect(f"send failed: {exc.strerror}")
                return False
            finally:
                for fd in out_fds:
                    close_quietly(fd)
        return True

    def disconnect(self, why: str) -> None:
        sock, session = self.sock, self.session
        if sock is None:
            return
        self.sock, self.session = None, None
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        self.counters["disconnects"] += 1
        self.loop.remove_reader(sock.fileno())
        for fd in self._fds:
            close_quietly(fd)
        self._fds, self._hdr = [], None
        self._buf.clear()
        if session is not None:
            try:
                session.close()
            except Exception as exc:  # a device bug at reset; the connection still goes
                self.counters["internal_errors"] += 1
                self.log.exception("vhost_user_error", error=repr(exc))
        for fd in list(self._watched):
            self.unwatch(fd)
        sock.close()
        self.log.info("vhost_user_disconnected", why=why)
        if self.connect and not self.stopped and self.retry is None:
            self.retry = self.loop.call_later(self.adaptor.reconnect, self._try_connect)

    def close(self) -> None:
        self.stopped = True
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        self.disconnect("daemon_stopping")
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                if os.stat(self.path).st_ino == self.listener_ino:
                    os.unlink(self.path)
            except OSError:
                pass


class VhostUserAdaptor(Adaptor):
    """Serves each device on its own vhost-user socket (docs/vhost-user.md)."""

    kind = "vhost-user"

    def __init__(self, config: Any, bus: Any, log: Any) -> None:
        super().__init__(bus, log)
        hv = config.hypervisor
        self.socket_mode: int = getattr(hv, "socket_mode", 0o600)
        self.reconnect: float = getattr(hv, "reconnect", 1.0)
        self._specs: list[tuple[str, VhostDevice, Path, bool, bool]] = []
        self.endpoints: list[Endpoint] = []

    def add_device(self, dev_id: str, device: VhostDevice, path: Path, connect: bool,
                   offer_config: bool = True) -> None:
        """Before start(): serve `device` on `path` (listening, or connecting when `connect`),
        offering VHOST_USER_PROTOCOL_F_CONFIG when `offer_config`."""
        self._specs.append((dev_id, device, path, connect, offer_config))

    async def start(self) -> None:
        for dev_id, device, path, connect, offer_config in self._specs:
            ep = Endpoint(self, dev_id, device, path, connect, offer_config)
            self.endpoints.append(ep)
            ep.open(self.socket_mode)

    def close_connections(self) -> None:
        """Every connection closed: devices reset, guest memory unmapped (before devices close).

        Also at a restart: the next instance is found by the VMM's reconnect, and what was in
        flight is redone from the inflight record (docs/vhost-user.md)."""
        for ep in self.endpoints:
            ep.disconnect("daemon_stopping")

    async def stop(self) -> None:
        for ep in self.endpoints:  # kept: the final adaptor_stats record reads their counters
            ep.close()

    def endpoint(self, dev_id: str) -> Endpoint:
        return next(ep for ep in self.endpoints if ep.dev_id == dev_id)

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ep in self.endpoints:
            for k, v in ep.counters.items():
                out[k] = out.get(k, 0) + v
        return out
