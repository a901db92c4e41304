"""virtio-console MULTIPORT: the Linux control flow, named ports, bulk transfers, hostile control."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import socket
import struct
import termios
from collections import deque
from pathlib import Path

import pytest

from tests.test_console_guest import ConsoleGuest, run_async
from vmmiod.config import (
    ConsoleConfig,
    ConsolePortConfig,
    FileBackend,
    GuestConfig,
    MmioConfig,
    PtyBackend,
    SocketBackend,
)
from vmmiod.devices.console import CONTROL_RECEIVEQ, CONTROL_TRANSMITQ, ConsoleDevice
from vmmiod.devices.console_backends import PortBackend
from vmmiod.devices.console_control import CONTROL, ControlEvent

MiB = 1 << 20


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PortBackend, "POLL_INTERVAL", 0.01)


def three_ports(tmp: Path, console_backend: object | None = None) -> ConsoleDevice:
    ports = (
        ConsolePortConfig("console", console_backend or FileBackend(path=tmp / "hvc0.log")),
        ConsolePortConfig("org.example.agent", SocketBackend(path=tmp / "agent.sock")),
        ConsolePortConfig("org.example.log", SocketBackend(path=tmp / "log.sock")),
    )  # type: ignore[arg-type]
    cfg = ConsoleConfig("con0", MmioConfig(0x1000, 5), ports, cols=100, rows=30)
    return ConsoleDevice(cfg, GuestConfig("test"))


async def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, str(path))
    return s


async def ready_guest(dev: ConsoleDevice, **kw: object) -> ConsoleGuest:
    guest = ConsoleGuest(dev, multiport=True, **kw)  # type: ignore[arg-type]
    await guest.until(lambda: all(p.added and p.name for p in guest.ports)
                      and guest.ports[0].console and guest.ports[0].size is not None,
                      what="ports added, named, console set up")
    return guest


@run_async
async def test_linux_control_flow(tmp_path: Path) -> None:
    dev = three_ports(tmp_path)
    await dev.open()
    guest = await ready_guest(dev)
    try:
        log = guest.control_log
        adds = [pid for pid, ev, v in log if ev is ControlEvent.DEVICE_ADD and v == 1]
        assert adds == [0, 1, 2]
        assert [p.name for p in guest.ports] == ["console", "org.example.agent",
                                                "org.example.log"]
        assert [p.id for p in guest.ports if p.console] == [0]
        assert guest.ports[0].size == (100, 30)
        # The file is always "connected"; nobody is on the sockets yet.
        assert [p.host_connected for p in guest.ports] == [True, False, False]
        # Per port: DEVICE_ADD before anything else about it, PORT_NAME only after PORT_READY.
        first = {pid: log.index(next(e for e in log if e[0] == pid)) for pid in range(3)}
        assert all(log[first[pid]][1] is ControlEvent.DEVICE_ADD for pid in range(3))
        client = await connect(tmp_path / "agent.sock")
        await guest.until(lambda: guest.ports[1].host_connected, what="PORT_OPEN 1")
        client.close()
        await guest.until(lambda: not guest.ports[1].host_connected, what="PORT_OPEN 0")
        assert not guest.ports[2].host_connected
        guest.write(0, b"to the console log\n")
        await guest.until(lambda: guest.tx_outstanding(0) == 0, what="console output")
        assert (tmp_path / "hvc0.log").read_bytes() == b"to the console log\n"
        assert guest.transport.faults == []
    finally:
        guest.close()
        await dev.close()


@run_async
async def test_host_input_waits_for_the_guest_to_open_the_port(tmp_path: Path) -> None:
    dev = three_ports(tmp_path)
    await dev.open()
    guest = await ready_guest(dev)
    try:
        client = await connect(tmp_path / "agent.sock")
        await guest.until(lambda: guest.ports[1].host_connected, what="host open")
        await asyncio.get_running_loop().sock_sendall(client, b"ping")
        await asyncio.sleep(0.1)
        guest.poll()
        # Linux discards input for a port no process has open: the device must not read it.
        assert guest.ports[1].received == b"" and dev.counters["port1_bytes_to_guest"] == 0
        guest.open_port(1)
        await guest.until(lambda: guest.ports[1].received == b"ping", what="input after open")
        client.close()
    finally:
        guest.close()
        await dev.close()


async def exchange(guest: ConsoleGuest, port: int, client: socket.socket,
                   to_host: bytes, to_guest: bytes) -> bytes:
    """Move `to_host` guest->host and `to_guest` host->guest at once; returns what the host got."""
    loop = asyncio.get_running_loop()
    got = bytearray()

    async def host_reader() -> None:
        while len(got) < len(to_host):
            chunk = await loop.sock_recv(client, MiB)
            assert chunk, "EOF before all guest output arrived"
            got.extend(chunk)

    reader = asyncio.create_task(host_reader())
    writer = asyncio.create_task(loop.sock_sendall(client, to_guest))
    sent = 0

    def pump() -> bool:
        nonlocal sent
        if sent < len(to_host):
            sent += guest.write(port, memoryview(to_host)[sent:])
        return sent == len(to_host) and len(guest.ports[port].received) >= len(to_guest)

    await guest.until(pump, timeout=60, what=f"port {port} guest side")
    await asyncio.wait_for(asyncio.gather(reader, writer), 60)
    return bytes(got)


@run_async
async def test_two_named_ports_16mib_each_way_with_checksums(tmp_path: Path) -> None:
    dev = three_ports(tmp_path)
    await dev.open()
    guest = await ready_guest(dev, rx_buf=64 * 1024, ram=96 * MiB)
    try:
        clients = [await connect(tmp_path / "agent.sock"), await connect(tmp_path / "log.sock")]
        for p in (1, 2):
            guest.open_port(p)
        await guest.until(lambda: guest.ports[1].host_connected and guest.ports[2].host_connected,
                          what="both ports open")
        streams = {p: (os.urandom(16 * MiB), os.urandom(16 * MiB)) for p in (1, 2)}
        results = await asyncio.gather(*(
            exchange(guest, p, clients[p - 1], *streams[p]) for p in (1, 2)))
        for p, host_got in zip((1, 2), results):
            to_host, to_guest = streams[p]
            assert hashlib.sha256(host_got).digest() == hashlib.sha256(to_host).digest()
            assert (hashlib.sha256(guest.ports[p].received).digest()
                    == hashlib.sha256(to_guest).digest())
            assert dev.counters[f"port{p}_bytes_from_guest"] == 16 * MiB
            assert dev.counters[f"port{p}_bytes_to_guest"] == 16 * MiB
        assert dev.counters["dropped_bytes"] == 0
        assert guest.ports[0].received == b""
        for c in clients:
            c.close()
        assert guest.transport.faults == []
    finally:
        guest.close()
        await dev.close()


@run_async
async def test_pty_resize_reaches_a_multiport_guest_as_resize_message(tmp_path: Path) -> None:
    link = tmp_path / "hvc0"
    dev = three_ports(tmp_path, PtyBackend(link=link))
    await dev.open()
    guest = await ready_guest(dev)
    slave = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
        await guest.until(lambda: guest.ports[0].size == (200, 60), what="RESIZE message")
        assert (dev.read_config(0, 2), dev.read_config(2, 2)) == (200, 60)
        # Config space changed too: the transport bumps ConfigGeneration (issue 15 item 7).
        assert guest.transport.config_changes >= 1
    finally:
        os.close(slave)
        guest.close()
        await dev.close()


@run_async
async def test_malformed_control_messages_are_dropped(tmp_path: Path) -> None:
    dev = three_ports(tmp_path)
    await dev.open()
    guest = await ready_guest(dev)
    try:
        before = len(guest.control_log)
        guest.send_raw(CONTROL_TRANSMITQ, b"\x01\x00")  # short
        guest.send_raw(CONTROL_TRANSMITQ, CONTROL.pack(0, 99, 1))  # unknown event
        guest.send_raw(CONTROL_TRANSMITQ, CONTROL.pack(0, ControlEvent.PORT_NAME, 1))
        guest.send_raw(CONTROL_TRANSMITQ, CONTROL.pack(7, ControlEvent.PORT_READY, 1))
        await guest.until(lambda: dev.counters.get("control_dropped", 0) == 4,
                          what="four drops")
        assert len(guest.control_log) == before
        assert guest.transport.faults == [] and not dev.failed
    finally:
        guest.close()
        await dev.close()


@run_async
async def test_control_backlog_is_bounded(tmp_path: Path) -> None:
    dev = three_ports(tmp_path)
    await dev.open()
    guest = ConsoleGuest(dev, multiport=True, queue_size=256)
    try:
        # The guest never reaps the control receiveq yet keeps asking for DEVICE_ADDs.
        for _ in range(200):
            guest.send_control(0xFFFFFFFF, ControlEvent.DEVICE_READY, 1)
            await asyncio.sleep(0)
        assert len(dev.control_out) <= dev.control_backlog
        assert dev.counters["control_dropped"] > 0
    finally:
        guest.close()
        await dev.close()


@run_async
async def test_transmit_chain_outside_guest_memory_faults_the_device(tmp_path: Path) -> None:
    dev = three_ports(tmp_path)
    await dev.open()
    guest = await ready_guest(dev)
    try:
        dq = guest.driver[5]  # transmitq of port 1
        dq.add([(0x10, 64)], [])  # below guest RAM
        guest.kick(5)
        await guest.until(lambda: bool(guest.transport.faults), what="fault")
        assert dev.failed
        # The device ignores its queues until reset: nothing more is answered.
        answered = guest.driver[CONTROL_RECEIVEQ].used_idx()
        guest.send_control(0, ControlEvent.PORT_READY, 1)
        await asyncio.sleep(0.05)
        assert dev.failed and guest.driver[CONTROL_RECEIVEQ].used_idx() == answered
    finally:
        guest.close()
        await dev.close()


@run_async
async def test_driver_without_multiport_gets_port_0_only(tmp_path: Path) -> None:
    dev = three_ports(tmp_path)
    await dev.open()
    guest = ConsoleGuest(dev, multiport=False)  # an old driver: queues 0 and 1 only
    try:
        guest.write(0, b"hvc0 only\n")
        await guest.until(lambda: guest.tx_outstanding(0) == 0, what="port 0 output")
        assert (tmp_path / "hvc0.log").read_bytes() == b"hvc0 only\n"
        assert not dev.multiport and dev.control_out == deque()
        assert guest.transport.faults == []
    finally:
        guest.close()
        await dev.close()


@run_async
async def test_guest_closing_a_port_stops_host_input(tmp_path: Path) -> None:
    dev = three_ports(tmp_path)
    await dev.open()
    guest = await ready_guest(dev)
    loop = asyncio.get_running_loop()
    try:
        client = await connect(tmp_path / "log.sock")
        guest.open_port(2)
        await loop.sock_sendall(client, b"one")
        await guest.until(lambda: guest.ports[2].received == b"one", what="input while open")
        guest.send_control(2, ControlEvent.PORT_OPEN, 0)
        await guest.until(lambda: not dev.ports[2].guest_open, what="guest close seen")
        await loop.sock_sendall(client, b"two")
        await asyncio.sleep(0.1)
        guest.poll()
        assert guest.ports[2].received == b"one"
        guest.open_port(2)
        await guest.until(lambda: guest.ports[2].received == b"onetwo", what="input resumes")
        client.close()
    finally:
        guest.close()
        await dev.close()
