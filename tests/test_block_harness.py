"""A guest for the virtio-blk tests: the driver model in a memfd, SplitQueues activated directly.

Not a test module by itself (no tests): shared by tests/test_block*.py. Without a running event
loop the device does everything inline (worker work included), so most tests are plain
synchronous code; `async` tests exercise the worker thread.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmmiod.config import BlockConfig, GuestConfig, MmioConfig
from vmmiod.devices.block import BlockDevice
from vmmiod.devices.block_request import DWZ_RANGE, REQ_HEADER
from vmmiod.memory import memfd_memory
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.virtqueue import SplitQueue

GPA = 0x4000_0000
MEM_SIZE = 32 << 20
UNWRITTEN = 0xEE  # status byte before the device writes it


class FakeTransport:
    """Records what the device asks of its transport."""

    def __init__(self) -> None:
        self.used: list[int] = []
        self.faults: list[str] = []
        self.config_changes = 0

    def signal_used(self, queue_index: int) -> None:
        self.used.append(queue_index)

    def signal_config_change(self) -> None:
        self.config_changes += 1

    def device_fault(self, reason: str) -> None:
        self.faults.append(reason)


# The engine the block tests run with: every test module that imports `io_engine` (below) runs
# once per engine; VMMIOD_TEST_IO_ENGINE picks the engine of the daemon-level tests.
ENGINES = ("io_uring", "threads", "sync")
ENGINE = {"name": os.environ.get("VMMIOD_TEST_IO_ENGINE", "auto")}


@pytest.fixture(params=ENGINES)
def io_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with each engine (the default of block_config for its duration)."""
    if request.param == "io_uring" and not uring_available():
        pytest.skip("io_uring is not available on this machine")
    saved = ENGINE["name"]
    ENGINE["name"] = request.param
    yield request.param
    ENGINE["name"] = saved


def uring_available() -> bool:
    try:
        from vmmiod.blockio.uring import Ring
        Ring(2).close()
        return True
    except OSError:
        return False


def block_config(path: Path, **kw: Any) -> BlockConfig:
    kw.setdefault("io_engine", ENGINE["name"])
    return BlockConfig(id=kw.pop("id", "vda"), mmio=MmioConfig(base=0x1000_0000, irq=5),
                       path=path, **kw)


def open_device(path: Path, *, guest: str = "testguest", **kw: Any) -> BlockDevice:
    dev = BlockDevice(block_config(path, **kw), GuestConfig(name=guest))
    asyncio.run(dev.open())
    return dev


class Reply:
    def __init__(self, status: int, data: bytes, used_len: int) -> None:
        self.status = status
        self.data = data
        self.used_len = used_len

    def __repr__(self) -> str:
        return f"Reply(status={self.status}, len={len(self.data)}, used_len={self.used_len})"


class Guest:
    """A driver for one BlockDevice: builds requests the way Linux's virtio_blk does."""

    def __init__(self, dev: BlockDevice, *, queue_size: int = 64, event_idx: bool = True,
                 indirect: bool = True, features: int | None = None,
                 queues: int | None = None) -> None:
        self.dev = dev
        self.mem, self.memfd = memfd_memory(MEM_SIZE, GPA)
        self.alloc = Allocator(GPA, MEM_SIZE)
        self.transport = FakeTransport()
        nq = len(dev.queue_max_sizes) if queues is None else queues
        self.dq: list[DriverQueue] = []
        sq: list[SplitQueue] = []
        for i in range(nq):
            d = DriverQueue(self.mem, self.alloc, queue_size, index=i, event_idx=event_idx,
                            indirect=indirect)
            q = SplitQueue(dev.queue_max_sizes[i], i)
            q.size, q.desc_addr, q.avail_addr, q.used_addr = (
                queue_size, d.desc_addr, d.avail_addr, d.used_addr)
            q.activate(self.mem, event_idx=event_idx, indirect=indirect)
            self.dq.append(d)
            sq.append(q)
        self.features = dev.device_features() if features is None else features
        dev.activate(self.mem, sq, self.features, self.transport)
        self.pending: dict[int, tuple[int, int, int]] = {}  # token -> data gpa, len, status gpa
        self._token = 0
        self.done: dict[int, Reply] = {}  # replies seen by wait() but not yet asked for

    # -- building requests ------------------------------------------------------------------------
    def buf(self, data: bytes | int, align: int = 4096) -> int:
        n = data if isinstance(data, int) else len(data)
        gpa = self.alloc.alloc(max(n, 1), align)
        if not isinstance(data, int):
            self.mem.write(gpa, data)
        return gpa

    def header(self, rtype: int, sector: int) -> int:
        return self.buf(REQ_HEADER.pack(rtype, 0, sector), 16)

    def submit_raw(self, out: list[tuple[int, int]], in_: list[tuple[int, int]], *,
                   queue: int = 0, data: tuple[int, int] = (0, 0),
                   status_gpa: int | None = None, indirect: bool | None = None) -> int:
        """Expose any chain; `data` (gpa, len) is read back into the reply."""
        self._token += 1
        if status_gpa is None and in_:
            status_gpa = in_[-1][0] + in_[-1][1] - 1
        if status_gpa is not None:
            self.mem.write(status_gpa, bytes([UNWRITTEN]))
        self.pending[self._token] = (data[0], data[1], -1 if status_gpa is None else status_gpa)
        self.dq[queue].add(out, in_, self._token, indirect)
        return self._token

    def submit(self, rtype: int, sector: int = 0, *, write: bytes | None = None,
               read: int = 0, ranges: list[tuple[int, int, int]] | None = None,
               queue: int = 0) -> int:
        hdr = self.header(rtype, sector)
        status = self.buf(1, 1)
        out = [(hdr, 16)]
        in_: list[tuple[int, int]] = []
        data = (0, 0)
        if write is not None:
            g = self.buf(write)
            out.append((g, len(write)))
        if ranges is not None:
            payload = b"".join(DWZ_RANGE.pack(*r) for r in ranges)
            out.append((self.buf(payload, 16), len(payload)))
        if read:
            g = self.buf(read)
            in_.append((g, read))
            data = (g, read)
        in_.append((status, 1))
        return self.submit_raw(out, in_, queue=queue, data=data, status_gpa=status)

    # -- running ----------------------------------------------------------------------------------
    def kick(self, queue: int = 0) -> None:
        if self.dq[queue].kick_prepare():
            self.dev.queue_notify(queue)

    def replies(self, queue: int = 0) -> dict[int, Reply]:
        out = {}
        for token, used_len in self.dq[queue].drain_used():
            gpa, n, sgpa = self.pending.pop(token)
            status = self.mem.read(sgpa, 1)[0] if sgpa >= 0 else -1
            out[token] = Reply(status, self.mem.read(gpa, n) if n else b"", used_len)
        return out

    def run(self, rtype: int, sector: int = 0, **kw: Any) -> Reply:
        """One request, synchronously (device activated outside a loop)."""
        queue = kw.get("queue", 0)
        token = self.submit(rtype, sector, **kw)
        self.kick(queue)
        return self.replies(queue)[token]

    async def wait(self, token: int, queue: int = 0, timeout: float = 10.0) -> Reply:
        """Poll the used ring until `token` is back (for tests with a running loop)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while token not in self.done:
            self.done.update(self.replies(queue))
            if token in self.done:
                break
            if loop.time() > deadline:
                raise TimeoutError(f"request {token} not completed")
            await asyncio.sleep(0.001)
        return self.done.pop(token)

    def close(self) -> None:
        self.dev.reset()
        self.mem.close()


def u64(b: bytes, off: int) -> int:
    v: int = struct.unpack_from("<Q", b, off)[0]
    return v
