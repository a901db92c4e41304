"""virtio-net (dgram backend) and virtio-console (socket backend) over vhost-user: the same
device objects as on the other adaptors, driven by the Python front-end through the real
adaptor; both served by one adaptor at once, each on its own socket."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vhost_user_peer import FrontEnd, ThreadedVhost
from vmmiod.config import (
    NO_WINDOW,
    ConsoleConfig,
    ConsolePortConfig,
    DgramBackend,
    GuestConfig,
    NetConfig,
    SocketAddress,
    SocketBackend,
    VhostUserSocket,
)
from vmmiod.devices.console import ConsoleDevice
from vmmiod.devices.net import NetDevice
from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.sim.sockets import connect_unix as connect

GUEST = GuestConfig("vu")
NET_HDR = 12  # struct virtio_net_hdr_v1 (VERSION_1)
VIRTIO_F_VERSION_1 = 32


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ThreadedVhost, NetDevice, ConsoleDevice, Path]]:
    net = NetDevice(NetConfig(
        id="net0", mmio=NO_WINDOW, vhost_user=VhostUserSocket(tmp_path / "net0.sock"),
        backend=DgramBackend(local=SocketAddress("udp", "127.0.0.1", 0))), GUEST)
    con = ConsoleDevice(ConsoleConfig(
        id="con0", mmio=NO_WINDOW, vhost_user=VhostUserSocket(tmp_path / "con0.sock"),
        ports=(ConsolePortConfig("console", SocketBackend(path=tmp_path / "console.sock")),)),
        GUEST)
    with ThreadedVhost([("net0", net, str(tmp_path / "net0.sock")),
                        ("con0", con, str(tmp_path / "con0.sock"))]) as d:
        yield d, net, con, tmp_path


def frame(n: int, size: int = 200) -> bytes:
    dst, src = b"\x52\x54\x00\x00\x00\x01", b"\x52\x54\x00\x00\x00\x02"
    return dst + src + b"\x08\x00" + bytes([n]) * (size - 14)


def test_net_frames_both_ways(served: tuple[ThreadedVhost, NetDevice, ConsoleDevice, Path]) -> None:
    _, net, _, _ = served
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(10)
    fe = FrontEnd(connect(str(served[3] / "net0.sock")))
    try:
        # QEMU's virtio-net keeps the control queue: only rx (0) and tx (1) reach the back-end.
        fe.negotiate(want=1 << VIRTIO_F_VERSION_1)
        fe.add_mem_reg()
        rx = fe.start_ring(0, size=64)
        fe.start_ring(1, size=64)
        bufs = []
        for i in range(8):
            gpa = fe.alloc.alloc(2048)
            bufs.append(gpa)
            rx.q.add([], [(gpa, 2048)], gpa)
        fe.kick(0)
        port = net.backend.local_address[1]  # type: ignore[attr-defined]
        for i in range(4):  # into the guest; the backend learns the peer from the first
            peer.sendto(frame(i), ("127.0.0.1", port))
        got = fe.wait_used(0, 4)
        for i, (gpa, length) in enumerate(got):
            assert length == NET_HDR + 200
            assert fe.memory.read(int(gpa) + NET_HDR, 200) == frame(i)  # type: ignore[arg-type]
        for i in range(4):  # out of the guest
            hdr = fe.alloc.alloc(NET_HDR + 300)
            fe.memory.write(hdr, bytes(NET_HDR) + frame(100 + i, 300))
            fe.rings[1].q.add([(hdr, NET_HDR + 300)], [], i)
        fe.kick(1)
        assert [t for t, _ in fe.wait_used(1, 4)] == [0, 1, 2, 3]
        for i in range(4):
            assert peer.recv(4096) == frame(100 + i, 300)
    finally:
        fe.close()
        peer.close()


def test_console_both_ways_while_net_is_served(
        served: tuple[ThreadedVhost, NetDevice, ConsoleDevice, Path]) -> None:
    d, _, con, tmp = served
    net_fe = FrontEnd(connect(str(tmp / "net0.sock")))  # another device's session, alongside
    fe = FrontEnd(connect(str(tmp / "con0.sock")))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        net_fe.negotiate()
        fe.negotiate(want=1 << VIRTIO_F_VERSION_1)
        fe.send(w.GET_CONFIG, w.pack_config(0, 12))
        cfg = fe.recv_reply(w.GET_CONFIG)[12:]
        assert cfg[:4] == (80).to_bytes(2, "little") + (25).to_bytes(2, "little")  # cols, rows
        fe.add_mem_reg()
        rx = fe.start_ring(0, size=16)
        fe.start_ring(1, size=16)
        gpa = fe.alloc.alloc(256)
        rx.q.add([], [(gpa, 256)], "in")
        fe.kick(0)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.connect(str(tmp / "console.sock"))
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        client.settimeout(10)
        out = fe.alloc.alloc(64)
        fe.memory.write(out, b"hello from the guest\n")
        fe.rings[1].q.add([(out, 21)], [], "out")
        fe.kick(1)
        assert fe.wait_used(1) == [("out", 0)]
        got = b""
        while len(got) < 21:
            got += client.recv(64)
        assert got == b"hello from the guest\n"
        client.sendall(b"typed\n")
        (token, length), = fe.wait_used(0)
        assert token == "in" and fe.memory.read(gpa, length) == b"typed\n"
        assert d.call(lambda: con.active) is True
    finally:
        client.close()
        fe.close()
        net_fe.close()
