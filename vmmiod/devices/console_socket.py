"""Unix stream socket backend of a virtio-console port.

The daemon listens on `path` (mode 0600: the console is as private as the guest). One client at
a time: a second one is told why and closed, or with `takeover: true` replaces the first (which
is told so). Clients come and go at any moment; output produced while none is attached goes to
the port's ring and is replayed to the next one (console_backends.PortBackend).

A client that half-closes (shutdown(SHUT_WR), e.g. `socat` after its stdin ended) still gets
output; it is dropped when it is fully gone: EPIPE/ECONNRESET on a write, or POLLHUP seen by the
periodic tick or when the next client knocks (so a dead client never blocks a new one).
"""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path
from typing import Any

from vmmiod.devices.console_backends import PortBackend
from vmmiod.unixsock import clear_stale_socket

REFUSED_MESSAGE = b"vmmiod: this console port already has a client; try again later\r\n"
TAKEN_OVER_MESSAGE = b"\r\nvmmiod: another client took over this console port\r\n"
LISTEN_BACKLOG = 16  # clients reconnecting faster than the loop accepts must not see EAGAIN
SOCKET_MODE = 0o600


class SocketBackend(PortBackend):
    kind = "socket"

    def __init__(self, path: Path, takeover: bool, *args: Any) -> None:
        super().__init__(*args)
        self.path = path
        self.takeover = takeover
        self.listener_sock: socket.socket | None = None
        self.client: socket.socket | None = None
        self._input_eof = False
        self._inode = 0

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        clear_stale_socket(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, SOCKET_MODE)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._inode = os.stat(self.path).st_ino
        self.listener_sock = sock
        await super().open()
        assert self.loop is not None
        self.loop.add_reader(sock.fileno(), self._on_accept)
        self.log.info("console_socket_listening", port=self.port, path=str(self.path))

    async def close(self) -> None:
        await super().close()
        if self.client is not None:
            self._drop_client("daemon stopping", notify=False)
        if self.listener_sock is not None:
            if self.loop is not None:
                self.loop.remove_reader(self.listener_sock.fileno())
            self.listener_sock.close()
            self.listener_sock = None
            try:
                if os.stat(self.path).st_ino == self._inode:
                    self.path.unlink()
            except FileNotFoundError:
                pass

    # -- clients --------------------------------------------------------------------------------
    def _on_accept(self) -> None:
        assert self.listener_sock is not None
        while True:
            try:
                conn, _ = self.listener_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the current client
                self._log_error("console_backend_error", op="accept", error=exc.strerror)
                return
            conn.setblocking(False)
            self._offer(conn)

    def _offer(self, conn: socket.socket) -> None:
        if self.client is not None and self._hung_up():
            self._drop_client("hang-up")
        if self.client is not None:
            if not self.takeover:
                self._say(conn, REFUSED_MESSAGE)
                conn.close()
                self.count.add("clients_refused")
                self.log.info("console_client_refused", port=self.port, path=str(self.path))
                return
            self._say(self.client, TAKEN_OVER_MESSAGE)
            self.log.info("console_client_taken_over", port=self.port, path=str(self.path))
            self._drop_client("taken over")
        self.client = conn
        self.fd = conn.fileno()
        self._input_eof = False
        self.log.info("console_client_connected", port=self.port, path=str(self.path))
        self._set_connected(True)

    @staticmethod
    def _say(conn: socket.socket, message: bytes) -> None:
        try:
            conn.send(message, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        except OSError:
            pass  # a courtesy only

    def _hung_up(self) -> bool:
        assert self.client is not None
        p = select.poll()
        p.register(self.client.fileno(), select.POLLIN)
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))

    def _drop_client(self, reason: str, notify: bool = True) -> None:
        client = self.client
        if client is None:
            return
        self.log.info("console_client_disconnected", port=self.port, reason=reason)
        if notify:
            self._set_connected(False)
        else:
            self._unwatch()
            self.connected = False
        self.client = None
        self.fd = None
        client.close()

    def _client_gone(self, reason: str) -> None:
        self._drop_client(reason)

    def tick(self) -> None:
        if self.client is not None and self._hung_up():
            self._drop_client("hang-up")

    # -- input ----------------------------------------------------------------------------------
    def _input_open(self) -> bool:
        return self.connected and not self._input_eof

    def _input_ended(self) -> None:
        if self._hung_up():
            self._drop_client("hang-up")
            return
        self._input_eof = True  # half-closed: output still flows to this client
        self._update_reader()
