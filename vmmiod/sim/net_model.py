"""A guest-side virtio-net driver model (the side Linux's virtio_net.c plays), for tests and
benchmarks. Never imported by the daemon.

It negotiates features with a NetDevice, lays its queues out in guest memory with the split
ring driver model (vmmiod/sim/vring.py), activates the device directly (no register window)
through a recording Transport, posts receive buffers (mergeable or big), sends frames and
issues control commands. Like the real driver it trusts nothing the device returns: header
lengths and num_buffers are checked against what it posted.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from vmmiod.devices.net import CTRL_QUEUE, RX_QUEUE, TX_QUEUE, NetDevice
from vmmiod.devices.net_proto import (
    MAX_GSO_FRAME,
    NET_HDR,
    NET_HDR_LEN,
    NET_HDR_LEN_LEGACY,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_MRG_RXBUF,
)
from vmmiod.memory import GuestMemory
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.transport import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from vmmiod.virtqueue import SplitQueue

MERGEABLE_BUF_SIZE = 1536 + NET_HDR_LEN  # about what Linux posts for a 1500-byte MTU


@dataclass(frozen=True)
class NetHdr:
    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self, length: int = NET_HDR_LEN) -> bytes:
        return NET_HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                            self.csum_start, self.csum_offset, self.num_buffers)[:length]

    @classmethod
    def unpack(cls, data: bytes) -> NetHdr:
        return cls(*NET_HDR.unpack(data.ljust(NET_HDR_LEN, b"\0")[:NET_HDR_LEN]))


class RecordingTransport:
    """The Transport a device talks to in tests: records and wakes waiters."""

    def __init__(self) -> None:
        self.used = [0, 0, 0]
        self.config_changes = 0
        self.faults: list[str] = []
        self._event = asyncio.Event()

    def signal_used(self, queue_index: int) -> None:
        self.used[queue_index] += 1
        self._event.set()

    def signal_config_change(self) -> None:
        self.config_changes += 1
        self._event.set()

    def device_fault(self, reason: str) -> None:
        self.faults.append(reason)
        self._event.set()

    async def wait(self, timeout: float) -> None:
        """Until the next signal (or the timeout): an interrupt as the guest sees it."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass
        self._event.clear()


class NetDriver:
    def __init__(self, device: NetDevice, memory: GuestMemory, alloc: Allocator, *,
                 want: int = ~0, queue_size: int = 256, event_idx: bool = True,
                 indirect: bool = False, rx_buf_size: int | None = None) -> None:
        self.device = device
        self.memory = memory
        self.alloc = alloc
        feats = device.device_features() & want
        if not event_idx:
            feats &= ~(1 << VIRTIO_F_EVENT_IDX)
        if not indirect:
            feats &= ~(1 << VIRTIO_F_INDIRECT_DESC)
        if not device.validate_features(feats):
            raise ValueError(f"device refused features {feats:#x}")
        self.features = feats
        self.mrg = self.has(VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = NET_HDR_LEN if self.mrg or self.has(VIRTIO_F_VERSION_1) \
            else NET_HDR_LEN_LEGACY
        gso = any(self.has(b) for b in (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
                                        VIRTIO_NET_F_GUEST_UFO))
        if rx_buf_size is None:
            rx_buf_size = MERGEABLE_BUF_SIZE if self.mrg else \
                self.hdr_len + (MAX_GSO_FRAME if gso else 14 + 4 + device.cfg.mtu)
        self.rx_buf_size = rx_buf_size
        ev = self.has(VIRTIO_F_EVENT_IDX)
        ind = self.has(VIRTIO_F_INDIRECT_DESC)
        nq = 3 if self.has(VIRTIO_NET_F_CTRL_VQ) else 2
        self.queues: list[DriverQueue] = []
        split: list[SplitQueue] = []
        for i in range(3):
            sq = SplitQueue(device.queue_max_sizes[i], i)
            if i < nq:
                size = min(queue_size, device.queue_max_sizes[i])
                dq = DriverQueue(memory, alloc, size, index=i, event_idx=ev, indirect=ind)
                self.queues.append(dq)
                sq.size, sq.desc_addr = size, dq.desc_addr
                sq.avail_addr, sq.used_addr = dq.avail_addr, dq.used_addr
                sq.activate(memory, event_idx=ev, indirect=ind)
            split.append(sq)
        self.rxq, self.txq = self.queues[RX_QUEUE], self.queues[TX_QUEUE]
        self.transport = RecordingTransport()
        self._rx_free: list[int] = []
        self._rx_posted = 0
        self.rx_errors = 0
        device.activate(memory, split, feats, self.transport)

    def has(self, n: int) -> bool:
        return bool(self.features >> n & 1)

    def kick(self, index: int) -> None:
        if self.queues[index].kick_prepare():
            self.device.queue_notify(index)

    # -- receive --------------------------------------------------------------------------------
    def post_rx(self, count: int | None = None) -> int:
        """Post receive buffers (until the ring is full, or `count`) and notify."""
        q = self.rxq
        n = 0
        while q.num_free and (count is None or n < count):
            gpa = self._rx_free.pop() if self._rx_free else self.alloc.alloc(self.rx_buf_size)
            q.add([], [(gpa, self.rx_buf_size)], token=gpa)
            n += 1
        self._rx_posted += n
        if n:
            self.kick(RX_QUEUE)
        return n

    def rx_frames(self) -> list[tuple[NetHdr, bytes]]:
        """Every complete frame returned so far (header, frame); buffers go back to the pool."""
        out = []
        while (u := self.rxq.get_used()) is not None:
            gpa, length = u
            self._rx_posted -= 1
            if length == 0:
                self.rx_errors += 1  # a buffer the device refused; Linux drops it the same way
                continue
            self._rx_free.append(gpa)
            if not self.hdr_len <= length <= self.rx_buf_size:
                raise RuntimeError(f"device returned a receive length of {length}")
            data = self.memory.read(gpa, length)
            hdr = NetHdr.unpack(data[:self.hdr_len])
            parts = [data[self.hdr_len:]]
            count = hdr.num_buffers if self.mrg else 1
            if not 1 <= count <= self.rxq.size:
                raise RuntimeError(f"device set num_buffers {count}")
            for _ in range(count - 1):
                more = self.rxq.get_used()
                if more is None:
                    raise RuntimeError("num_buffers promised more buffers than were returned")
                gpa, length = more
                self._rx_posted -= 1
                self._rx_free.append(gpa)
                parts.append(self.memory.read(gpa, length))
            out.append((hdr, b"".join(parts)))
        return out

    def rx_recycle(self) -> int:
        """Benchmark form: count returned buffers and post them again, reading nothing."""
        n = 0
        q = self.rxq
        while (u := q.get_used()) is not None:
            q.add([], [(u[0], self.rx_buf_size)], token=u[0])
            n += 1
        if n:
            self.kick(RX_QUEUE)
        return n

    async def recv(self, count: int = 1, timeout: float = 3.0,
                   repost: bool = True) -> list[tuple[NetHdr, bytes]]:
        """Wait for at least `count` frames (fewer on timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        got: list[tuple[NetHdr, bytes]] = []
        while True:
            got += self.rx_frames()
            if repost:
                self.post_rx()
            left = deadline - loop.time()
            if len(got) >= count or left <= 0:
                return got
            await self.transport.wait(min(left, 0.05))

    # -- transmit -------------------------------------------------------------------------------
    def send(self, frame: bytes, hdr: NetHdr | None = None, *, kick: bool = True,
             split_at: int | None = None) -> int:
        """Queue one frame (header first, optionally as two descriptors); returns its head."""
        self.reclaim_tx()
        data = (hdr or NetHdr()).pack(self.hdr_len) + frame
        gpa = self.alloc.alloc(len(data))
        self.memory.write(gpa, data)
        if split_at is None:
            out = [(gpa, len(data))]
        else:
            out = [(gpa, split_at), (gpa + split_at, len(data) - split_at)]
        head = self.txq.add(out, [], token=(gpa, len(data)))
        if kick:
            self.kick(TX_QUEUE)
        return head

    def send_prepared(self, gpa: int, length: int) -> None:
        """Benchmark form: a frame already in guest memory (header included), no kick."""
        self.txq.add([(gpa, length)], [], token=None)

    def reclaim_tx(self) -> int:
        n = 0
        while (u := self.txq.get_used()) is not None:
            if u[0] is not None:
                self.alloc.free(*u[0])
            n += 1
        return n

    async def flush_tx(self, timeout: float = 3.0) -> None:
        """Wait until the device has returned every transmitted chain."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.txq.pending() and loop.time() < deadline:
            self.reclaim_tx()
            if self.txq.pending():
                await self.transport.wait(0.02)
        self.reclaim_tx()

    # -- control --------------------------------------------------------------------------------
    async def command(self, cls: int, cmd: int, data: bytes = b"", timeout: float = 2.0) -> int:
        """One control command; returns the device's ack byte."""
        q = self.queues[CTRL_QUEUE]
        out = self.alloc.alloc(2 + len(data))
        ack = self.alloc.alloc(1)
        self.memory.write(out, bytes((cls, cmd)) + data)
        self.memory.write(ack, b"\xee")
        q.add([(out, 2 + len(data))], [(ack, 1)], token="ctrl")
        self.kick(CTRL_QUEUE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while q.get_used() is None:
            if loop.time() > deadline:
                raise TimeoutError("control command not answered")
            await self.transport.wait(0.05)
        return self.memory.read(ack, 1)[0]


def mac_table(entries: list[bytes]) -> bytes:
    """One `virtio_net_ctrl_mac` table for VIRTIO_NET_CTRL_MAC_TABLE_SET."""
    return struct.pack("<I", len(entries)) + b"".join(entries)

