"""Guest virtio-blk driver (like Linux's virtio_blk.c) and the block workload.

A request is three buffers: the 16-byte header {u32 type, u32 reserved, u64 sector}, the data,
and one status byte the device writes. With INDIRECT_DESC negotiated the driver model puts them
in an indirect table, as Linux does for every multi-buffer request.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vmmiod.hypervisors.generic.protocol import Window
from vmmiod.sim.virtio_mmio import VIRTIO_F_INDIRECT_DESC, DeviceFailed, VirtioMmioDriver
from vmmiod.sim.vmm import SimError, SimVmm
from vmmiod.sim.vring import DriverQueue

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
BLK_REQ_HDR = struct.Struct("<IIQ")  # type, reserved, sector

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
DRIVER_FEATURES = sum(1 << b for b in (
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_TOPOLOGY))

CONFIG_CAPACITY = 0  # u64, in 512-byte sectors
CONFIG_BLK_SIZE = 20  # u32


@dataclass
class _Slot:
    """Per in-flight request: header, status and data buffers allocated once."""

    hdr: int
    status: int
    data: int
    data_size: int
    token: Any = None


@dataclass
class BlockResult:
    status: int
    data: bytes = b""


@dataclass
class BlockDriver:
    vmm: SimVmm
    window: Window
    queue_size: int = 128
    max_io: int = 128 * 1024
    depth: int = 32
    drv: VirtioMmioDriver = field(init=False)
    q: DriverQueue = field(init=False)
    capacity: int = 0  # sectors
    readonly: bool = False
    counters: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "bytes_read": 0, "bytes_written": 0, "kicks": 0})

    def start(self) -> None:
        self.drv = VirtioMmioDriver(self.vmm, self.window)
        if self.drv.probe() != VIRTIO_ID_BLOCK:
            raise DeviceFailed(f"{self.window.base:#x}: device id {self.drv.device_id}, not block")
        self.drv.negotiate(DRIVER_FEATURES)
        (self.q,) = self.drv.setup_queues([self.queue_size])
        self.capacity = self.drv.config_read64(CONFIG_CAPACITY)
        self.readonly = self.drv.has(VIRTIO_BLK_F_RO)
        self.drv.driver_ok()
        # One descriptor per request with indirect tables, three without.
        per_request = 1 if self.drv.has(VIRTIO_F_INDIRECT_DESC) else 3
        self.depth = min(self.depth, self.q.size // per_request)
        alloc = self.vmm.alloc
        self._free = [_Slot(alloc.alloc(BLK_REQ_HDR.size), alloc.alloc(1, 1),
                            alloc.alloc(self.max_io, 4096), self.max_io)
                      for _ in range(self.depth)]

    @property
    def features(self) -> int:
        return self.drv.features

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, rtype: int, sector: int, data: bytes | None = None, length: int = 0,
               token: Any = None) -> _Slot:
        """Queue one request (not kicked). `data` for OUT, `length` bytes to read for IN/GET_ID."""
        if not self._free:
            raise SimError("no free request slot")
        slot = self._free.pop()
        mem = self.vmm.memory
        mem.write(slot.hdr, BLK_REQ_HDR.pack(rtype, 0, sector))
        mem.write(slot.status, b"\xff")  # the device must overwrite it
        out = [(slot.hdr, BLK_REQ_HDR.size)]
        in_: list[tuple[int, int]] = []
        if data is not None:
            mem.write(slot.data, data)
            out.append((slot.data, len(data)))
        elif length:
            in_.append((slot.data, length))
        in_.append((slot.status, 1))
        slot.token = (token, rtype, len(data) if data is not None else length)
        self.q.add(out, in_, slot)
        return slot

    def kick(self) -> None:
        if self.drv.kick(self.q):
            self.counters["kicks"] += 1

    def complete(self) -> list[tuple[Any, BlockResult]]:
        """Collect finished requests: (token, result) and free their slots."""
        out = []
        mem = self.vmm.memory
        while (u := self.q.get_used()) is not None:
            slot, _written = u
            token, rtype, length = slot.token
            status = mem.read(slot.status, 1)[0]
            data = mem.read(slot.data, length) if rtype in (VIRTIO_BLK_T_IN,
                                                            VIRTIO_BLK_T_GET_ID) else b""
            self.counters["requests"] += 1
            if status == VIRTIO_BLK_S_OK:
                if rtype == VIRTIO_BLK_T_IN:
                    self.counters["bytes_read"] += length
                elif rtype == VIRTIO_BLK_T_OUT:
                    self.counters["bytes_written"] += length
            self._free.append(slot)
            out.append((token, BlockResult(status, data)))
        return out

    def wait_all(self, timeout: float | None = None) -> list[tuple[Any, BlockResult]]:
        """Wait (on the interrupt line) until every submitted request completed."""
        done: list[tuple[Any, BlockResult]] = []

        def ready() -> bool:
            done.extend(self.complete())
            return self.q.pending() == 0

        self.drv.wait(ready, timeout)
        return done

    def request(self, rtype: int, sector: int, data: bytes | None = None,
                length: int = 0) -> BlockResult:
        self.submit(rtype, sector, data, length)
        self.kick()
        ((_, result),) = self.wait_all()
        return result

    def stop(self) -> None:
        self.drv.teardown()


# -- workload --------------------------------------------------------------------------------------
def run_block_workload(dev: BlockDriver, *, span: int = 4 << 20, random_ops: int = 200,
                       seed: int = 1, image_path: str | None = None,
                       progress: Any = None) -> dict[str, Any]:
    """Sequential then random I/O over the first `span` bytes; every byte read is verified.

    Returns figures and a list of failed checks (empty: all passed). With `image_path`, the
    backing file itself is compared with what the guest wrote after a FLUSH.
    """
    rng = random.Random(seed)
    failures: list[str] = []
    span = min(span, dev.capacity * SECTOR_SIZE) // 4096 * 4096
    shadow = bytearray(rng.randbytes(span))
    io = min(dev.max_io, 64 * 1024)
    t0 = time.perf_counter()

    ident = dev.request(VIRTIO_BLK_T_GET_ID, 0, length=VIRTIO_BLK_ID_BYTES)
    if ident.status != VIRTIO_BLK_S_OK:
        failures.append(f"GET_ID status {ident.status}")
    serial = ident.data.rstrip(b"\0").decode("ascii", "replace")

    def batch(ops: Sequence[tuple[int, int, int, bytes | None]]) -> None:
        """ops: (type, offset, length, data to write); `depth` at a time, reads verified."""
        pos = 0
        while pos < len(ops):
            chunk = ops[pos:pos + dev.depth]
            pos += len(chunk)
            for rtype, off, n, data in chunk:
                if rtype == VIRTIO_BLK_T_OUT:
                    if data is not None:
                        shadow[off:off + n] = data
                    dev.submit(rtype, off // SECTOR_SIZE, bytes(shadow[off:off + n]),
                               token=(rtype, off, n))
                else:
                    dev.submit(rtype, off // SECTOR_SIZE, length=n, token=(rtype, off, n))
            dev.kick()
            for (rtype, off, n), res in dev.wait_all():
                if res.status != VIRTIO_BLK_S_OK:
                    failures.append(f"type {rtype} at {off:#x}+{n}: status {res.status}")
                elif rtype == VIRTIO_BLK_T_IN and res.data != shadow[off:off + n]:
                    failures.append(f"read at {off:#x}+{n}: data differs from what was written")
            if progress is not None:
                progress(dev.counters)

    seq = [(VIRTIO_BLK_T_OUT, off, min(io, span - off), None) for off in range(0, span, io)]
    reads = [(VIRTIO_BLK_T_IN, off, n, None) for _, off, n, _ in seq]
    batch(seq)
    batch(reads)
    # Random I/O: requests in flight together have no order in virtio, so a batch never holds
    # two requests that overlap when one of them writes; the shadow stays the truth.
    rnd: list[tuple[int, int, int, bytes | None]] = []
    for _ in range(random_ops):
        n = rng.choice((512, 4096, 8192, 65536 if io >= 65536 else 4096))
        off = rng.randrange(0, (span - n) // SECTOR_SIZE + 1) * SECTOR_SIZE
        write = rng.random() < 0.5
        clash = any(o < off + n and off < o + k and (write or t == VIRTIO_BLK_T_OUT)
                    for t, o, k, _ in rnd)
        if clash or len(rnd) == dev.depth:
            batch(rnd)
            rnd = []
        rnd.append((VIRTIO_BLK_T_OUT, off, n, rng.randbytes(n)) if write
                   else (VIRTIO_BLK_T_IN, off, n, None))
    batch(rnd)
    flush = dev.request(VIRTIO_BLK_T_FLUSH, 0)
    if flush.status != VIRTIO_BLK_S_OK:
        failures.append(f"FLUSH status {flush.status}")
    beyond = dev.request(VIRTIO_BLK_T_IN, dev.capacity, length=SECTOR_SIZE)
    if beyond.status != VIRTIO_BLK_S_IOERR:
        failures.append(f"read past capacity: status {beyond.status}, expected IOERR")
    batch(reads)  # final verification of every byte
    if image_path is not None:
        with open(image_path, "rb") as f:
            if f.read(span) != shadow:
                failures.append("backing file differs from what the guest wrote")
    elapsed = time.perf_counter() - t0
    return {"serial": serial, "capacity_sectors": dev.capacity, "span_bytes": span,
            "requests": dev.counters["requests"], "bytes_read": dev.counters["bytes_read"],
            "bytes_written": dev.counters["bytes_written"], "seconds": round(elapsed, 3),
            "failures": failures}
