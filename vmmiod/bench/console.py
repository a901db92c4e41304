"""Console benchmark: bytes/s each way through a ConsoleDevice and its socket backend.

One port (hvc0, no MULTIPORT), a Unix-socket client on the host side, a driver-model guest in
the same event loop (queues in memfd memory, no register window: this measures the device and
backend, not the IOREQ channel). Two buffer shapes: 4 KiB (Linux fills the receiveq with
PAGE_SIZE buffers and hvc writes at most a page) and 64 KiB chains. Figures only.

Run: `python -m vmmiod.bench.console [--quick]`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from vmmiod.bench.options import quick_option
from vmmiod.config import ConsoleConfig, ConsolePortConfig, GuestConfig, MmioConfig, SocketBackend
from vmmiod.devices.console import ConsoleDevice
from vmmiod.devices.console_port import RECEIVEQ0, TRANSMITQ0
from vmmiod.memory import memfd_memory
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.transport import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, bit
from vmmiod.virtqueue import SplitQueue

GPA = 0x4000_0000
RAM = 32 << 20
QUEUE_SIZE = 64


def _quiet_log() -> Any:
    def drop(*_: Any) -> Any:
        raise structlog.DropEvent
    return structlog.wrap_logger(None, processors=[drop])


class _Transport:
    def __init__(self) -> None:
        self.event = asyncio.Event()

    def signal_used(self, queue_index: int) -> None:
        self.event.set()

    def signal_config_change(self) -> None:
        pass

    def device_fault(self, reason: str) -> None:
        raise RuntimeError(f"console device faulted: {reason}")


async def _measure(buf: int, total: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "con.sock"
        cfg = ConsoleConfig("bench", MmioConfig(0x1000, 5),
                            (ConsolePortConfig("console", SocketBackend(path=path)),))
        dev = ConsoleDevice(cfg, GuestConfig("bench"), log=_quiet_log())
        await dev.open()
        memory, fd = memfd_memory(RAM, GPA)
        alloc = Allocator(GPA, RAM)
        transport = _Transport()
        drivers, queues = [], []
        for i in (RECEIVEQ0, TRANSMITQ0):
            dq = DriverQueue(memory, alloc, QUEUE_SIZE, index=i, event_idx=True)
            sq = SplitQueue(QUEUE_SIZE, i)
            sq.desc_addr, sq.avail_addr, sq.used_addr = dq.desc_addr, dq.avail_addr, dq.used_addr
            sq.activate(memory, event_idx=True)
            drivers.append(dq)
            queues.append(sq)
        rxq, txq = drivers
        dev.activate(memory, queues, bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX),
                     transport)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        await loop.sock_connect(client, str(path))
        while not dev.ports[0].backend.connected:
            await asyncio.sleep(0.001)

        def kick(dq: DriverQueue) -> None:
            if dq.kick_prepare():
                dev.queue_notify(dq.index)

        async def wait_used() -> None:
            transport.event.clear()
            try:
                await asyncio.wait_for(transport.event.wait(), 0.01)
            except TimeoutError:
                pass

        # Guest to host.
        payload = os.urandom(buf)
        tx_buf = alloc.alloc(buf, 64)  # every chain carries the same bytes: the device only reads
        memory.write(tx_buf, payload)
        received = 0

        async def host_reader() -> None:
            nonlocal received
            while received < total:
                received += len(await loop.sock_recv(client, 1 << 20))

        t0 = time.perf_counter()
        reader = asyncio.create_task(host_reader())
        queued = 0
        while queued < total:
            for _, _ in txq.drain_used():
                pass
            while txq.num_free and queued < total:
                txq.add([(tx_buf, buf)], [], token=None)
                queued += buf
            kick(txq)
            await wait_used()
        await reader
        to_host = total / (time.perf_counter() - t0)

        # Host to guest.
        for _ in range(QUEUE_SIZE):
            gpa = alloc.alloc(buf, 64)
            rxq.add([], [(gpa, buf)], token=gpa)
        kick(rxq)
        got = 0
        t0 = time.perf_counter()
        writer = asyncio.create_task(loop.sock_sendall(client, os.urandom(1 << 20) * (total >> 20)))
        while got < total:
            for gpa, n in rxq.drain_used():
                got += n
                rxq.add([], [(gpa, buf)], token=gpa)
            kick(rxq)
            if got < total:
                await wait_used()
        await writer
        to_guest = total / (time.perf_counter() - t0)
        client.close()
        dev.reset()
        await dev.close()
        memory.close()
        os.close(fd)
        return {"guest_to_host_MBps": round(to_host / 1e6, 1),
                "host_to_guest_MBps": round(to_guest / 1e6, 1)}


def run(quick: bool = False) -> dict[str, Any]:
    total = (8 if quick else 64) << 20
    results: dict[str, Any] = {}
    for buf in (4096, 65536):
        results[f"socket {buf // 1024} KiB buffers"] = asyncio.run(_measure(buf, total))
    return results


def main(argv: list[str] | None = None) -> int:
    results = run(quick=quick_option("console", "virtio-console figures: MB/s each way through the device, per buffer shape.", argv))
    print(f"{'console shape':28} {'guest->host MB/s':>17} {'host->guest MB/s':>17}")
    for key, r in results.items():
        print(f"{key:28} {r['guest_to_host_MBps']:17.1f} {r['host_to_guest_MBps']:17.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
