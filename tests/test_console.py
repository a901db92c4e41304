"""virtio-console with one port: pty, socket and file backends, ring buffer, EMERG_WRITE."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
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
from vmmiod.devices.base import BackendError
from vmmiod.devices.console import (
    CONFIG,
    CONFIG_EMERG_WR,
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    ConsoleDevice,
)
from vmmiod.devices.console_backends import OutputRing, PortBackend
from vmmiod.devices.console_socket import REFUSED_MESSAGE, TAKEN_OVER_MESSAGE
from vmmiod.transport import VIRTIO_F_ACCESS_PLATFORM

GUEST = GuestConfig("test")


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PortBackend, "POLL_INTERVAL", 0.01)


def console(*backends: object, buffer: int = 65536, **kw: object) -> ConsoleDevice:
    ports = tuple(ConsolePortConfig(f"port{i}", b, buffer)  # type: ignore[arg-type]
                  for i, b in enumerate(backends))
    cfg = ConsoleConfig("con0", MmioConfig(0x1000, 5), ports, **kw)  # type: ignore[arg-type]
    return ConsoleDevice(cfg, GUEST)


async def read_until(reader: asyncio.StreamReader, n: int, timeout: float = 10) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout)


# -- ring buffer ------------------------------------------------------------------------------
def test_ring_keeps_newest_bytes_and_counts_the_rest() -> None:
    ring = OutputRing(8)
    assert ring.append(b"abcde") == 0
    assert ring.append(b"fghij") == 2
    assert bytes(ring.data) == b"cdefghij"
    assert ring.append(b"0123456789AB") == 12
    assert bytes(ring.data) == b"456789AB"
    ring.consume(3)
    assert bytes(ring.data) == b"789AB"
    assert OutputRing(0).append(b"xy") == 2


# -- features and config ----------------------------------------------------------------------
def test_features_and_config_space() -> None:
    dev = console(FileBackend(path=Path("/nonexistent/x")), cols=132, rows=43)
    f = dev.device_features()
    assert f & (1 << VIRTIO_CONSOLE_F_SIZE) and f & (1 << VIRTIO_CONSOLE_F_EMERG_WRITE)
    assert not f & (1 << VIRTIO_CONSOLE_F_MULTIPORT)
    assert len(dev.queue_max_sizes) == 2
    assert CONFIG.unpack(dev.config_bytes()) == (132, 43, 1, 0)
    assert dev.read_config(0, 2) == 132 and dev.read_config(2, 2) == 43
    multi = console(*(FileBackend(path=Path(f"/x{i}")) for i in range(3)))
    assert multi.device_features() & (1 << VIRTIO_CONSOLE_F_MULTIPORT)
    assert len(multi.queue_max_sizes) == 8  # (3 ports + control) * 2, as Linux's init_vqs
    assert multi.read_config(4, 4) == 3
    assert not f & (1 << VIRTIO_F_ACCESS_PLATFORM)
    grants = ConsoleDevice(dev.cfg, GUEST, access_platform=True)
    assert grants.device_features() & (1 << VIRTIO_F_ACCESS_PLATFORM)


# -- pty --------------------------------------------------------------------------------------
@run_async
async def test_pty_round_trip_link_and_resize(tmp_path: Path) -> None:
    link = tmp_path / "console" / "guest.pty"
    dev = console(PtyBackend(link=link), cols=80, rows=25)
    await dev.open()
    guest = ConsoleGuest(dev, multiport=False)
    try:
        backend = dev.ports[0].backend
        assert link.is_symlink() and os.readlink(link).startswith("/dev/pts/")
        assert not backend.connected  # nobody has the slave open yet
        slave = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            await guest.until(lambda: backend.connected, what="pty client seen")
            os.write(slave, b"hello guest\n")
            await guest.until(lambda: guest.ports[0].received == b"hello guest\n",
                              what="pty input in the guest")
            guest.write(0, b"hello host\r\n")
            got = bytearray()

            def pty_has_output() -> bool:
                try:
                    got.extend(os.read(slave, 4096))
                except BlockingIOError:
                    pass
                return got == b"hello host\r\n"
            await guest.until(pty_has_output, what="guest output on the pty")
            # Resize on the slave (what a terminal emulator does): reaches the guest config.
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
            await guest.until(lambda: guest.transport.config_changes >= 1,
                              what="config change interrupt")
            assert (dev.read_config(0, 2), dev.read_config(2, 2)) == (132, 50)
            assert dev.counters["port0_bytes_to_guest"] == len(b"hello guest\n")
            assert dev.counters["port0_bytes_from_guest"] == len(b"hello host\r\n")
        finally:
            os.close(slave)
        await guest.until(lambda: not backend.connected, what="pty hang-up seen")
        # Nobody attached: output goes to the ring and is replayed to the next client.
        guest.write(0, b"while away")
        await guest.until(lambda: guest.tx_outstanding(0) == 0, what="tx completed")
        slave = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            got.clear()
            await guest.until(lambda: pty_has_output() or got == b"while away",
                              what="replay on the pty")
        finally:
            os.close(slave)
        assert guest.transport.faults == []
    finally:
        guest.close()
        await dev.close()
    assert not link.exists()


@run_async
async def test_pty_link_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    link = tmp_path / "guest.pty"
    link.write_text("precious")
    dev = console(PtyBackend(link=link))
    with pytest.raises(BackendError, match="not a symlink"):
        await dev.open()
    assert link.read_text() == "precious"


# -- socket -----------------------------------------------------------------------------------
@run_async
async def test_socket_disconnect_while_guest_writes_then_replay(tmp_path: Path) -> None:
    path = tmp_path / "con.sock"
    dev = console(SocketBackend(path=path), buffer=4096)
    await dev.open()
    guest = ConsoleGuest(dev, multiport=False)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        reader, writer = await asyncio.open_unix_connection(str(path))
        await guest.until(lambda: dev.ports[0].backend.connected, what="client attached")
        guest.write(0, b"first")
        assert await read_until(reader, 5) == b"first"
        writer.write(b"typed")
        await guest.until(lambda: guest.ports[0].received == b"typed", what="socket input")
        writer.close()
        await writer.wait_closed()
        # The guest keeps writing (10 KiB) after the client left: never blocked, the newest
        # 4 KiB are kept, the rest is counted as dropped.
        stream = bytes(i % 251 for i in range(10240))
        sent = 0
        while sent < len(stream):
            sent += guest.write(0, stream[sent:], chunk=1000)
            await guest.until(lambda: guest.tx_outstanding(0) == 0, what="tx drained")
        assert not dev.ports[0].backend.connected
        assert dev.counters["port0_dropped_bytes"] == len(stream) - 4096
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await read_until(reader, 4096) == stream[-4096:]
        guest.write(0, b"live again")
        assert await read_until(reader, 10) == b"live again"
        assert dev.counters["port0_client_connects"] == 2
        writer.close()
    finally:
        guest.close()
        await dev.close()
    assert not path.exists()


@pytest.mark.parametrize("takeover", [False, True])
@run_async
async def test_socket_second_client_refused_or_takes_over(tmp_path: Path, takeover: bool) -> None:
    path = tmp_path / "con.sock"
    dev = console(SocketBackend(path=path, takeover=takeover))
    await dev.open()
    guest = ConsoleGuest(dev, multiport=False)
    try:
        r1, w1 = await asyncio.open_unix_connection(str(path))
        await guest.until(lambda: dev.ports[0].backend.connected, what="first client")
        r2, w2 = await asyncio.open_unix_connection(str(path))
        if not takeover:
            assert await asyncio.wait_for(r2.read(), 5) == REFUSED_MESSAGE
            guest.write(0, b"still yours")
            assert await read_until(r1, 11) == b"still yours"
            assert dev.counters["port0_clients_refused"] == 1
        else:
            assert await asyncio.wait_for(r1.read(), 5) == TAKEN_OVER_MESSAGE
            await guest.until(lambda: dev.counters["port0_client_connects"] == 2,
                              what="takeover")
            guest.write(0, b"new owner")
            assert await read_until(r2, 9) == b"new owner"
        w1.close()
        w2.close()
    finally:
        guest.close()
        await dev.close()


@run_async
async def test_socket_dead_client_does_not_block_the_next(tmp_path: Path) -> None:
    path = tmp_path / "con.sock"
    dev = console(SocketBackend(path=path))
    await dev.open()
    try:
        _, w1 = await asyncio.open_unix_connection(str(path))
        await asyncio.sleep(0.05)
        w1.close()  # gone without the device ever reading or writing
        r2, w2 = await asyncio.open_unix_connection(str(path))
        dev.write_config(CONFIG_EMERG_WR, 4, ord("!"))
        assert await read_until(r2, 1) == b"!"
        w2.close()
    finally:
        await dev.close()


@run_async
async def test_socket_in_use_by_another_listener_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "con.sock"
    first = console(SocketBackend(path=path))
    await first.open()
    try:
        with pytest.raises(BackendError, match="in use"):
            await console(SocketBackend(path=path)).open()
    finally:
        await first.close()
    # A stale socket file (daemon died) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    dev = console(SocketBackend(path=path))
    await dev.open()
    await dev.close()


# -- back-pressure ----------------------------------------------------------------------------
@run_async
async def test_slow_client_stalls_the_transmitq_without_dropping(tmp_path: Path) -> None:
    path = tmp_path / "con.sock"
    dev = console(SocketBackend(path=path), buffer=1024)
    await dev.open()
    guest = ConsoleGuest(dev, multiport=False, queue_size=16)
    try:
        loop = asyncio.get_running_loop()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        await loop.sock_connect(client, str(path))
        await guest.until(lambda: dev.ports[0].backend.connected, what="client attached")
        data = os.urandom(4 << 20)
        sent = guest.write(0, data)
        # The client reads nothing: the socket fills, the device stops completing chains.
        await asyncio.sleep(0.2)
        guest.poll()
        assert guest.tx_outstanding(0) > 0
        assert dev.ports[0].tx_pending is not None
        assert dev.counters["port0_dropped_bytes"] == 0 and len(dev.ports[0].backend.ring) == 0

        async def pump() -> None:
            nonlocal sent
            while sent < len(data):
                sent += guest.write(0, data[sent:])
                await guest.until(lambda: guest.tx_outstanding(0) < 16, what="tx room")
        task = asyncio.create_task(pump())
        got = bytearray()
        while len(got) < len(data):
            chunk = await loop.sock_recv(client, 1 << 20)
            assert chunk, "client saw EOF"
            got += chunk
        await task
        assert got == data
        assert dev.counters["port0_dropped_bytes"] == 0
        client.close()
    finally:
        guest.close()
        await dev.close()


@run_async
async def test_input_is_read_only_into_guest_buffers(tmp_path: Path) -> None:
    path = tmp_path / "con.sock"
    dev = console(SocketBackend(path=path))
    await dev.open()
    guest = ConsoleGuest(dev, multiport=False, queue_size=4, rx_buf=1000)
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
        await guest.until(lambda: dev.ports[0].backend.connected, what="client attached")
        writer.write(b"x" * 100_000)
        # The driver does not repost buffers: exactly 4 x 1000 bytes may move, no more.
        dq = guest.driver[0]
        await asyncio.sleep(0.1)
        used = dq.drain_used()
        assert sorted(n for _, n in used) == [1000] * 4
        assert dev.counters["port0_bytes_to_guest"] == 4000
        assert not dev.ports[0].backend.input_wanted  # reader off until buffers come back
        for (gpa, size), _ in used:
            dq.add([], [(gpa, size)], token=(gpa, size))
        guest.kick(0)
        await asyncio.sleep(0.1)
        assert dev.counters["port0_bytes_to_guest"] == 8000
        writer.close()
    finally:
        guest.close()
        await dev.close()


# -- file and EMERG_WRITE ---------------------------------------------------------------------
@run_async
async def test_file_backend_appends_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "guest.log"
    dev = console(FileBackend(path=path))
    await dev.open()
    guest = ConsoleGuest(dev, multiport=False)
    try:
        guest.write(0, b"before rotation\n")
        await guest.until(lambda: guest.tx_outstanding(0) == 0, what="tx done")
        rotated = path.with_suffix(".log.1")
        path.rename(rotated)
        dev.reopen()
        guest.write(0, b"after rotation\n")
        await guest.until(lambda: guest.tx_outstanding(0) == 0, what="tx done")
        assert rotated.read_bytes() == b"before rotation\n"
        assert path.read_bytes() == b"after rotation\n"
    finally:
        guest.close()
        await dev.close()


@run_async
async def test_emergency_write_before_any_queue(tmp_path: Path) -> None:
    path = tmp_path / "guest.log"
    dev = console(FileBackend(path=path))
    dev.write_config(CONFIG_EMERG_WR, 4, ord(">"))  # even before the backend is open
    await dev.open()
    try:
        for ch in b"early panic":  # no activate(): no queue exists yet
            dev.write_config(CONFIG_EMERG_WR, 4, 0xABCD00 | ch)
        assert path.read_bytes() == b">early panic"
        assert dev.counters["emergency_writes"] == 12
    finally:
        await dev.close()
    # Socket with no client yet: kept in the ring and replayed.
    sock = tmp_path / "con.sock"
    dev = console(SocketBackend(path=sock))
    await dev.open()
    try:
        for ch in b"oops":
            dev.write_config(CONFIG_EMERG_WR, 1, ch)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        assert await read_until(reader, 4) == b"oops"
        writer.close()
    finally:
        await dev.close()
