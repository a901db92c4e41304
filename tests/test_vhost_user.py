"""vhost-user adaptor: block, net (dgram) and console served to a Python front-end over a real
Unix socket, through the real adaptor and the same device objects the other adaptors use."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vhost_user_peer import (
    BLK_T_GET_ID,
    BLK_T_IN,
    BLK_T_OUT,
    FrontEnd,
    ThreadedVhost,
    blk_request,
)
from vmmiod.config import NO_WINDOW, BlockConfig, GuestConfig, VhostUserSocket
from vmmiod.devices.block import BlockDevice
from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.sim.sockets import connect_unix as connect

GUEST = GuestConfig("vu")


def block_device(tmp_path: Path, name: str = "disk0", size: int = 4 << 20) -> BlockDevice:
    img = tmp_path / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    cfg = BlockConfig(id=name, mmio=NO_WINDOW, path=img,
                      vhost_user=VhostUserSocket(tmp_path / f"{name}.sock"))
    return BlockDevice(cfg, GUEST)


@pytest.fixture
def blk(tmp_path: Path) -> Iterator[tuple[ThreadedVhost, BlockDevice, str]]:
    dev = block_device(tmp_path)
    sock = str(tmp_path / "disk0.sock")
    with ThreadedVhost([("disk0", dev, sock)]) as d:
        yield d, dev, sock


def test_block_write_read_round_trip(blk: tuple[ThreadedVhost, BlockDevice, str]) -> None:
    _, dev, sock = blk
    fe = FrontEnd(connect(sock))
    try:
        fe.negotiate()
        fe.add_mem_reg()
        fe.start_ring(0, size=64)
        payload = os.urandom(8192)
        _, _, st = blk_request(fe, 0, BLK_T_OUT, 8, payload, token="w")
        fe.kick(0)
        assert fe.wait_used(0) == [("w", 1)]
        assert fe.memory.read(st, 1) == b"\0"
        _, buf, st = blk_request(fe, 0, BLK_T_IN, 8, read_len=8192, token="r")
        fe.kick(0)
        assert fe.wait_used(0) == [("r", 8193)]
        assert fe.memory.read(st, 1) == b"\0"
        assert fe.memory.read(buf, 8192) == payload
        assert (dev.cfg.path.read_bytes()[8 * 512:8 * 512 + 8192]) == payload
    finally:
        fe.close()


def test_negotiation_answers(blk: tuple[ThreadedVhost, BlockDevice, str]) -> None:
    _, dev, sock = blk
    fe = FrontEnd(connect(sock))
    try:
        offered = fe.negotiate()
        assert offered == dev.device_features() | 1 << w.F_PROTOCOL_FEATURES
        assert fe.protocol == w.PROTOCOL_FEATURES
        assert fe.call_u64(w.GET_QUEUE_NUM) == 1
        assert fe.call_u64(w.GET_MAX_MEM_SLOTS) == 32
        fe.send(w.GET_CONFIG, w.pack_config(0, 60))
        cfg = fe.recv_reply(w.GET_CONFIG)
        offset, size, _ = w.CONFIG_HEAD.unpack_from(cfg)
        assert (offset, size) == (0, 60)
        assert cfg[12:20] == (dev.cfg.path.stat().st_size // 512).to_bytes(8, "little")
        assert cfg[12:12 + len(dev.config_bytes())] == dev.config_bytes()
    finally:
        fe.close()


def test_get_vring_base_stops_and_ring_restarts_there(
        blk: tuple[ThreadedVhost, BlockDevice, str]) -> None:
    d, dev, sock = blk
    fe = FrontEnd(connect(sock))
    try:
        fe.negotiate()
        fe.set_mem_table()
        ring = fe.start_ring(0, size=16)
        for i in range(20):  # past the ring size: indexes wrap the slots
            blk_request(fe, 0, BLK_T_OUT, i, bytes([i]) * 512, token=i)
            fe.kick(0)
            assert fe.wait_used(0) == [(i, 1)]
        assert d.call(lambda: dev.active) is True
        assert fe.stop_ring(0) == 20
        assert d.call(lambda: dev.active) is False  # its last ring stopped: device reset
        fe.start_ring(0, base=20, q=ring.q)  # same ring memory, resumed at the base
        blk_request(fe, 0, BLK_T_GET_ID, 0, read_len=20, token="id")
        fe.kick(0)
        assert fe.wait_used(0) == [("id", 21)]
    finally:
        fe.close()


def test_next_front_end_is_served_after_a_disconnect(
        blk: tuple[ThreadedVhost, BlockDevice, str]) -> None:
    d, _, sock = blk
    for round_ in range(3):
        fe = FrontEnd(connect(sock))
        try:
            fe.negotiate()
            fe.add_mem_reg()
            fe.start_ring(0)
            blk_request(fe, 0, BLK_T_OUT, round_, b"x" * 512, token=round_)
            fe.kick(0)
            assert fe.wait_used(0) == [(round_, 1)]
        finally:
            fe.close()
        assert fe.memfd  # closed by close(); the daemon must have let go of the mapping too
    stats = d.call(lambda: d.adaptor.stats())  # type: ignore[attr-defined]
    assert stats["connections"] == 3


def test_second_front_end_is_refused_while_one_is_connected(
        blk: tuple[ThreadedVhost, BlockDevice, str]) -> None:
    _, _, sock = blk
    first = FrontEnd(connect(sock))
    try:
        first.negotiate()
        second = FrontEnd(connect(sock))
        try:
            assert second.closed_by_peer()
        finally:
            second.close()
        assert first.call_u64(w.GET_QUEUE_NUM) == 1  # the first one is untouched
    finally:
        first.close()


def test_connect_mode_reaches_a_listening_vmm_and_comes_back_after_it_goes(
        tmp_path: Path) -> None:
    dev = block_device(tmp_path)
    path = tmp_path / "vmm.sock"
    with ThreadedVhost([("disk0", dev, f"connect:{path}")], reconnect=0.05) as d:
        time.sleep(0.2)  # nobody listens yet: the daemon retries
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        server.settimeout(10)
        for round_ in range(2):
            conn, _ = server.accept()
            fe = FrontEnd(conn)
            try:
                fe.negotiate()
                fe.add_mem_reg()
                fe.start_ring(0)
                blk_request(fe, 0, BLK_T_OUT, round_, b"c" * 512, token=round_)
                fe.kick(0)
                assert fe.wait_used(0) == [(round_, 1)]
            finally:
                fe.close()  # the VMM goes away; the daemon connects again
        server.close()
        stats = d.call(lambda: d.adaptor.stats())  # type: ignore[attr-defined]
        assert stats["connections"] == 2 and stats["connect_failures"] >= 1


def test_fds_with_every_byte_close_the_connection_not_exhaust_the_daemon(
        blk: tuple[ThreadedVhost, BlockDevice, str]) -> None:
    d, _, sock = blk
    fe = FrontEnd(connect(sock))
    evs = [os.eventfd(0) for _ in range(4)]
    try:
        message = w.request(w.GET_FEATURES)
        try:
            for i in range(len(message)):  # 4 fds with every byte of one header
                socket.send_fds(fe.sock, [message[i:i + 1]], evs)
        except OSError:  # closed by the daemon on the way
            pass
        assert fe.closed_by_peer()
    finally:
        for fd in evs:
            os.close(fd)
        fe.close()
    ep = d.call(lambda: d.adaptor.endpoint("disk0"))  # type: ignore[attr-defined]
    assert d.call(lambda: dict(ep.violation_reasons)) == {"too_many_fds": 1}


def test_a_silent_connection_does_not_hold_the_device(
        blk: tuple[ThreadedVhost, BlockDevice, str]) -> None:
    d, _, sock = blk
    ep = d.call(lambda: d.adaptor.endpoint("disk0"))  # type: ignore[attr-defined]
    d.call(lambda: setattr(ep, "first_message_timeout", 0.2))
    squatter = FrontEnd(connect(sock))
    try:
        assert squatter.closed_by_peer()
        assert d.call(lambda: dict(ep.violation_reasons)) == {"silent": 1}
    finally:
        squatter.close()
    fe = FrontEnd(connect(sock))  # the VMM gets the device
    try:
        fe.negotiate()
        assert fe.call_u64(w.GET_QUEUE_NUM) == 1
    finally:
        fe.close()


def test_multiqueue_block_each_ring_started_on_its_own(tmp_path: Path) -> None:
    img = tmp_path / "mq.img"
    img.write_bytes(bytes(1 << 20))
    dev = BlockDevice(BlockConfig(id="mq", mmio=NO_WINDOW, path=img, queues=2,
                                  vhost_user=VhostUserSocket(tmp_path / "mq.sock")), GUEST)
    sock = str(tmp_path / "mq.sock")
    with ThreadedVhost([("mq", dev, sock)]) as d:
        fe = FrontEnd(connect(sock))
        try:
            fe.negotiate()
            assert fe.call_u64(w.GET_QUEUE_NUM) == 2
            fe.add_mem_reg()
            fe.start_ring(0, size=16)
            blk_request(fe, 0, BLK_T_OUT, 0, b"0" * 512, token="q0")
            fe.kick(0)
            assert fe.wait_used(0) == [("q0", 1)]
            fe.start_ring(1, size=32)  # the device is active already: only this ring starts
            _, buf, _ = blk_request(fe, 1, BLK_T_IN, 0, read_len=512, token="q1")
            fe.kick(1)
            assert fe.wait_used(1) == [("q1", 513)]
            assert fe.memory.read(buf, 512) == b"0" * 512
            assert fe.stop_ring(0) == 1
            assert d.call(lambda: dev.active) is True  # ring 1 still runs
            blk_request(fe, 1, BLK_T_OUT, 1, b"1" * 512, token="q1b")
            fe.kick(1)
            assert fe.wait_used(1) == [("q1b", 1)]
            assert fe.stop_ring(1) == 2
            assert d.call(lambda: dev.active) is False
        finally:
            fe.close()


def test_a_stale_socket_is_replaced_but_a_live_one_is_left_alone(tmp_path: Path) -> None:
    """docs/configuration.md: a stale socket file of an earlier run is replaced; the socket of
    a back-end still listening (a second vmmiod started for the same guest) is not taken over:
    the daemon refuses to start and the running one keeps its socket."""
    path = tmp_path / "disk0.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a killed predecessor's
    with ThreadedVhost([("disk0", block_device(tmp_path), str(path))]):
        fe = FrontEnd(connect(str(path)))
        try:
            assert fe.call_u64(w.GET_FEATURES) >> w.F_PROTOCOL_FEATURES & 1
        finally:
            fe.close()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        d = ThreadedVhost([("disk0", block_device(tmp_path), str(path))])
        with pytest.raises(FileExistsError, match="another process listens"):
            d.start()
        d.stop()
        client = connect(str(path))  # still the live back-end's socket
        live.settimeout(5)
        accepted, _ = live.accept()
        accepted.close()
        client.close()
    finally:
        live.close()
