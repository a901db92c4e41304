"""Guest virtio-console driver (like Linux's virtio_console.c, single port: /dev/hvc0) and workload.

Port 0 without MULTIPORT: queue 0 receiveq (device to driver, filled with page-sized buffers as
Linux's fill_queue does), queue 1 transmitq. The host end of the workload is a client of the
console's socket backend.
"""

from __future__ import annotations

import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from vmmiod.hypervisors.generic.protocol import Window
from vmmiod.sim.sockets import connect_unix
from vmmiod.sim.virtio_mmio import DeviceFailed, VirtioMmioDriver
from vmmiod.sim.vmm import SimError, SimVmm
from vmmiod.sim.vring import DriverQueue

VIRTIO_ID_CONSOLE = 3
VIRTIO_CONSOLE_F_SIZE = 0
DRIVER_FEATURES = 1 << VIRTIO_CONSOLE_F_SIZE  # no MULTIPORT: the hvc0 case
CONFIG_COLS = 0
CONFIG_ROWS = 2
RX_BUF = 4096  # PAGE_SIZE, as Linux
TX_CHUNK = 4096
RECEIVEQ0, TRANSMITQ0 = 0, 1


@dataclass
class ConsoleDriver:
    vmm: SimVmm
    window: Window
    queue_size: int = 64
    drv: VirtioMmioDriver = field(init=False)
    rxq: DriverQueue = field(init=False)
    txq: DriverQueue = field(init=False)
    cols: int = 0
    rows: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"tx_bytes": 0, "rx_bytes": 0})

    def start(self) -> None:
        self.drv = VirtioMmioDriver(self.vmm, self.window)
        if self.drv.probe() != VIRTIO_ID_CONSOLE:
            raise DeviceFailed(f"{self.window.base:#x}: device id {self.drv.device_id}, "
                               f"not console")
        self.drv.negotiate(DRIVER_FEATURES)
        self.rxq, self.txq = self.drv.setup_queues([self.queue_size, self.queue_size])
        if self.drv.has(VIRTIO_CONSOLE_F_SIZE):
            self.cols = self.drv.config_read(CONFIG_COLS, 2)
            self.rows = self.drv.config_read(CONFIG_ROWS, 2)
        alloc = self.vmm.alloc
        self._tx_free = [alloc.alloc(TX_CHUNK, 64) for _ in range(self.txq.size)]
        self.drv.driver_ok()
        for _ in range(self.rxq.size):
            gpa = alloc.alloc(RX_BUF, 64)
            self.rxq.add([], [(gpa, RX_BUF)], gpa)
        self.drv.kick(self.rxq)
        self._pending_rx = bytearray()

    @property
    def features(self) -> int:
        return self.drv.features

    def _reclaim_tx(self) -> bool:
        while (u := self.txq.get_used()) is not None:
            self._tx_free.append(u[0])
        return bool(self._tx_free)

    def write(self, data: bytes) -> None:
        """Transmit `data` in page-sized chunks (one descriptor each)."""
        for pos in range(0, len(data), TX_CHUNK):
            chunk = data[pos:pos + TX_CHUNK]
            if not self._reclaim_tx():
                self.drv.kick(self.txq)
                self.drv.wait(self._reclaim_tx)
            gpa = self._tx_free.pop()
            self.vmm.memory.write(gpa, chunk)
            self.txq.add([(gpa, len(chunk))], [], gpa)
            self.counters["tx_bytes"] += len(chunk)
            if self.txq.num_free == 0:
                self.drv.kick(self.txq)
        self.drv.kick(self.txq)

    def flush(self) -> None:
        self.drv.wait(lambda: self._reclaim_tx() and self.txq.pending() == 0)

    def poll_rx(self) -> bytes:
        out = bytearray()
        mem = self.vmm.memory
        while (u := self.rxq.get_used()) is not None:
            gpa, length = u
            if length > RX_BUF:
                raise SimError(f"console rx used length {length} exceeds the buffer")
            out += mem.read(gpa, length)
            self.rxq.add([], [(gpa, RX_BUF)], gpa)
        if out:
            self.counters["rx_bytes"] += len(out)
            self.drv.kick(self.rxq)
        return bytes(out)

    def read_exact(self, n: int, timeout: float | None = None) -> bytes:
        buf = self._pending_rx

        def ready() -> bool:
            buf.extend(self.poll_rx())
            return len(buf) >= n

        self.drv.wait(ready, timeout)
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def stop(self) -> None:
        self.drv.teardown()


connect_console = connect_unix  # the console socket of a `unix` console port


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(65536, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def run_console_workload(dev: ConsoleDriver, client: socket.socket, *, echoes: int = 20,
                         bulk: int = 256 * 1024, seed: int = 3,
                         progress: Any = None) -> dict[str, Any]:
    """Echo lines (host -> guest -> host) and a bulk transfer each way, every byte compared."""
    rng = random.Random(seed)
    failures: list[str] = []
    t0 = time.perf_counter()
    for i in range(echoes):
        line = f"ping {i} {rng.randrange(1 << 32):08x}\n".encode()
        client.sendall(line)
        got = dev.read_exact(len(line))
        if got != line:
            failures.append(f"echo {i}: guest read {got!r}, host sent {line!r}")
            break
        dev.write(b"echo: " + got)
        back = _recv_exact(client, len(line) + 6)
        if back != b"echo: " + line:
            failures.append(f"echo {i}: host read {back!r}")
            break
    t_echo = time.perf_counter() - t0
    out = rng.randbytes(bulk)
    t1 = time.perf_counter()
    # Guest to host: the host reads concurrently in chunks between the guest's writes.
    received = bytearray()
    step = 32 * 1024
    for pos in range(0, bulk, step):
        dev.write(out[pos:pos + step])
        received += _recv_exact(client, min(step, bulk - pos))
    dev.flush()
    if bytes(received) != out:
        failures.append(f"bulk guest->host: host got {len(received)} bytes, content "
                        f"{'differs' if len(received) == bulk else 'short'}")
    inbound = rng.randbytes(bulk)
    in_guest = bytearray()
    for pos in range(0, bulk, step):
        client.sendall(inbound[pos:pos + step])
        in_guest += dev.read_exact(min(step, bulk - pos))
    if bytes(in_guest) != inbound:
        failures.append("bulk host->guest: guest read different bytes")
    t_bulk = time.perf_counter() - t1
    return {"cols": dev.cols, "rows": dev.rows, "echoes": echoes,
            "echo_round_trip_ms": round(1000 * t_echo / max(echoes, 1), 3),
            "bulk_bytes_each_way": bulk,
            "bulk_mb_per_s": round(2 * bulk / t_bulk / 1e6, 2) if t_bulk else 0,
            "failures": failures}
