"""The socket side of a vhost-user front-end (the VMM's end), shared by the tests' front-end
(tests/vhost_user_peer.py) and the vhost-user benchmark (vmmiod/bench/vhost.py).

Plain blocking code, as a VMM's vhost-user thread is (connect with
vmmiod.sim.sockets.connect_unix): send a request with its fds, read a whole reply and the fds that came with it.
"""

from __future__ import annotations

import socket

from vmmiod.hypervisors.vhost_user import wire as w


def send(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("the back-end closed the connection")
        out += chunk
    return out


def recv_message(sock: socket.socket) -> tuple[int, int, bytes, list[int]]:
    """One whole message from the back-end: (request, flags, payload, fds)."""
    data, fds, _, _ = socket.recv_fds(sock, w.HEADER_SIZE, 4)
    if not data:
        raise ConnectionError("the back-end closed the connection")
    data += recv_exact(sock, w.HEADER_SIZE - len(data))
    request, flags, size = w.HEADER.unpack(data)
    return request, flags, recv_exact(sock, size), list(fds)
