"""The datagram backend of virtio-net: one Ethernet frame per UDP or Unix datagram.

The framing of QEMU's `-netdev dgram`: the datagram is the bare Ethernet frame, no virtio
header and no length prefix, so two vmmiod guests (or a vmmiod guest and a QEMU VM) can be
wired without root and without a bridge. No offloads: the device writes a plain header
(no flags, GSO_NONE) in front of each received frame and strips the header on transmit.

With a `remote`, frames go there and datagrams from anyone else are dropped; without one the
backend answers whoever sent last (learned peer), and drops transmissions until it knows one.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

from vmmiod.config import DgramBackend, SocketAddress
from vmmiod.devices.base import BackendError
from vmmiod.devices.net_proto import scatter, skip_views
from vmmiod.unixsock import clear_stale_socket

RECV_FOREIGN = -1  # recv() result: a datagram from someone other than the remote, dropped


def _describe(addr: SocketAddress | None) -> str | None:
    return None if addr is None else str(addr)


class DgramSocket:
    """One datagram socket carrying Ethernet frames."""

    offloads = False

    def __init__(self, cfg: DgramBackend, log: Any) -> None:
        self.cfg = cfg
        self.log = log
        self.fd = -1
        self.link_up = False  # up from open() to close(): a socket has no carrier to lose
        self.sock: socket.socket | None = None
        self.peer: Any = None  # resolved remote (or learned) address
        self._fixed_peer = False
        self._connected = False
        self._bound_path: str | None = None
        self._zero_hdr = bytes(12)

    def describe(self) -> dict[str, Any]:
        return {"backend": "dgram", "local": _describe(self.cfg.local),
                "remote": _describe(self.cfg.remote)}

    @property
    def local_address(self) -> Any:
        return self.sock.getsockname() if self.sock is not None else None

    # -- lifecycle ------------------------------------------------------------------------------
    def open(self, loop: asyncio.AbstractEventLoop, on_link: Callable[[bool], None]) -> None:
        local, remote = self.cfg.local, self.cfg.remote
        if remote is not None and remote.family != local.family:
            raise BackendError("dgram backend: local and remote must both be udp or both unix")
        try:
            if local.family == "unix":
                self.sock = self._open_unix(local)
                if remote is not None:
                    self.peer = str(remote.path)
            else:
                self.sock, self.peer = self._open_udp(local, remote)
        except OSError as exc:
            raise BackendError(f"dgram backend {_describe(local)}: {exc.strerror or exc}") from None
        self._fixed_peer = self.peer is not None
        self.fd = self.sock.fileno()
        self.link_up = True
        self.log.info("net_backend_opened", backend="dgram",
                      local=str(self.sock.getsockname()), remote=_describe(remote))

    def _open_unix(self, local: SocketAddress) -> socket.socket:
        if local.path is None:
            raise BackendError("dgram backend: a unix local address needs a path")
        path = str(local.path)
        try:
            clear_stale_socket(path, socket.SOCK_DGRAM)
        except OSError as exc:
            raise BackendError(f"dgram backend: {exc.strerror}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        self._bound_path = path
        return sock

    @staticmethod
    def _open_udp(local: SocketAddress,
                  remote: SocketAddress | None) -> tuple[socket.socket, Any]:
        peer = None
        family = socket.AF_INET
        if remote is not None:
            info = socket.getaddrinfo(remote.host, remote.port, type=socket.SOCK_DGRAM)[0]
            family, peer = info[0], info[4]
        else:
            info = socket.getaddrinfo(local.host or None, local.port, type=socket.SOCK_DGRAM,
                                      flags=socket.AI_PASSIVE)[0]
            family = info[0]
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            sock.bind((local.host, local.port))
        except OSError:
            sock.close()
            raise
        return sock, peer

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.fd = -1
        self.link_up = False
        if self._bound_path is not None:
            try:
                os.unlink(self._bound_path)
            except OSError:
                pass
            self._bound_path = None

    def configure(self, hdr_len: int, features: int) -> None:
        """Nothing to tell the socket: it carries bare frames."""

    # -- data path ------------------------------------------------------------------------------
    def _same_peer(self, addr: Any) -> bool:
        if isinstance(addr, tuple) and isinstance(self.peer, tuple):
            return bool(addr[:2] == self.peer[:2])
        return bool(addr == self.peer)

    def recv(self, iov: list[memoryview], cap: int, hdr_len: int) -> int:
        """Receive one frame after a plain header written at the start of `iov`.

        Returns header + frame length; more than `cap` means it did not fit; RECV_FOREIGN when
        it came from someone other than the remote. Raises BlockingIOError when none is queued.
        """
        assert self.sock is not None
        n, _anc, flags, addr = self.sock.recvmsg_into(skip_views(iov, hdr_len))
        if self._fixed_peer:
            if not self._same_peer(addr):
                return RECV_FOREIGN
        elif addr:
            self.peer = addr
        if flags & socket.MSG_TRUNC:
            return cap + 1
        scatter(iov, 0, self._zero_hdr[:hdr_len])
        return hdr_len + n

    def send(self, views: list[memoryview], hdr_len: int) -> bool:
        """Send the frame after the header. False when there is nobody to send to (yet).

        Raises BlockingIOError when the socket (or a Unix peer's queue) is full.
        """
        assert self.sock is not None
        if self.peer is None:
            return False
        data = skip_views(views, hdr_len)
        if self.sock.family != socket.AF_UNIX or not self._fixed_peer:
            self.sock.sendmsg(data, (), 0, self.peer)
            return True
        # A Unix remote is connected once it exists: then the kernel refuses other senders
        # and poll() reports the peer's queue, so a full peer means wait, not spin.
        try:
            if not self._connected:
                self.sock.connect(self.peer)
                self._connected = True
            self.sock.sendmsg(data)
        except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError):
            self._connected = False  # the peer is not (or no longer) there: a lost frame
            return False
        return True
