"""A closed-loop guest driver of one split virtqueue with fixed request slots (benchmarks).

`DriverQueue` (vring.py) models Linux's virtio_ring.c: a free list, an indirect table allocated
per request, a used-ring read per element. In a benchmark the guest model runs in the device's
own process and thread, so what it costs is taken from the device's CPU, while a real guest
spends it on its own vCPUs. `SlotDriver` is the same guest protocol at the least cost a driver
can have: request `i` of the queue depth always uses descriptor `i`, an indirect table written
once (header, data, status), so issuing a request is two stores (the header's sector and the
avail entry), and a batch publishes avail.idx once. Completions are still checked as a driver
must: the used id names a slot in flight, the used length is the request's, and the status
byte (set to 0xFF at issue) was written by the device.

Guest side: the ring layout comes from vring.py (the spec), never from the device side.
"""

from __future__ import annotations

import struct

from vmmiod import barrier
from vmmiod.memory import GuestMemory
from vmmiod.sim.vring import (
    AVAIL_IDX,
    AVAIL_RING,
    DESC_TABLE_ALIGN,
    USED_IDX,
    USED_RING,
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_USED_ELEM,
    Allocator,
    DriverQueue,
    avail_event_offset,
    need_event,
    used_event_offset,
)

_U16 = struct.Struct("<H")
_HEADER = struct.Struct("<IIQ")  # struct virtio_blk_req: type, reserved, sector (VIRTIO 5.2.6)
STATUS_UNSET = 0xFF  # written before a request is issued: the device must overwrite it


class SlotDriver:
    """`depth` block requests of `block` bytes, each on its own fixed descriptor."""

    def __init__(self, memory: GuestMemory, alloc: Allocator, size: int, depth: int,
                 block: int, rtype: int, write: bool) -> None:
        if not 1 <= depth <= size:
            raise ValueError(f"depth {depth} outside 1..{size}")
        ring = DriverQueue(memory, alloc, size, event_idx=True, indirect=True)
        self.desc_addr, self.avail_addr, self.used_addr = (ring.desc_addr, ring.avail_addr,
                                                           ring.used_addr)
        self.size, self.depth, self.block, self.rtype = size, depth, block, rtype
        self.write = write
        self.headers = alloc.alloc(16 * depth, 16)
        self.status = alloc.alloc(depth, 1)
        self.data = [alloc.alloc(block, 4096) for _ in range(depth)]
        tables = alloc.alloc(3 * VIRTQ_DESC_SIZE * depth, DESC_TABLE_ALIGN)
        data_flags = 0 if write else VIRTQ_DESC_F_WRITE
        for i in range(depth):
            t = tables + 3 * VIRTQ_DESC_SIZE * i
            memory.write(t, VIRTQ_DESC.pack(self.headers + 16 * i, 16, VIRTQ_DESC_F_NEXT, 1)
                         + VIRTQ_DESC.pack(self.data[i], block, data_flags | VIRTQ_DESC_F_NEXT, 2)
                         + VIRTQ_DESC.pack(self.status + i, 1, VIRTQ_DESC_F_WRITE, 0))
            memory.write(self.desc_addr + VIRTQ_DESC_SIZE * i,
                         VIRTQ_DESC.pack(t, 3 * VIRTQ_DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0))
        self._hdr, self._hdr_off = memory.locate(self.headers, 16 * depth, True)
        self._st, self._st_off = memory.locate(self.status, depth, True)
        self._avail, self._avail_off = memory.locate(self.avail_addr, AVAIL_RING + 2 * size + 2,
                                                     True)
        self._used, self._used_off = memory.locate(self.used_addr, avail_event_offset(size) + 2)
        self._used_len = 1 if write else block + 1
        self._in_flight = bytearray(depth)
        self.avail_idx = self._published = self.last_used = 0
        self.outstanding = 0

    def issue(self, slot: int, sector: int) -> None:
        """Expose request `slot` for `sector` (visible to the device at `publish`)."""
        if self._in_flight[slot]:
            raise RuntimeError(f"slot {slot} is already in flight")
        self._in_flight[slot] = 1
        self.outstanding += 1
        _HEADER.pack_into(self._hdr, self._hdr_off + 16 * slot, self.rtype, 0, sector)
        self._st[self._st_off + slot] = STATUS_UNSET
        idx = self.avail_idx
        _U16.pack_into(self._avail, self._avail_off + AVAIL_RING + 2 * (idx % self.size), slot)
        self.avail_idx = (idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """avail.idx for everything issued; True when the device asked for a notification."""
        barrier.wmb()  # ring entries before the index that covers them
        new, old = self.avail_idx, self._published
        _U16.pack_into(self._avail, self._avail_off + AVAIL_IDX, new)
        self._published = new
        barrier.mb()  # the index before reading the device's avail_event
        event: int = _U16.unpack_from(self._used, self._used_off
                                      + avail_event_offset(self.size))[0]
        return need_event(event, new, old)

    def reap(self) -> list[int]:
        """The slots the device completed since the last reap, each checked."""
        used, base = self._used, self._used_off
        idx: int = _U16.unpack_from(used, base + USED_IDX)[0]
        n = (idx - self.last_used) & 0xFFFF
        if n > self.outstanding:
            raise RuntimeError(f"used.idx {idx} is {n} ahead, {self.outstanding} in flight")
        barrier.rmb()  # the elements after the index that covers them
        out: list[int] = []
        pos, mask = self.last_used, self.size - 1
        in_flight, st, st_off, want = self._in_flight, self._st, self._st_off, self._used_len
        unpack = VIRTQ_USED_ELEM.unpack_from
        for _ in range(n):
            slot, length = unpack(used, base + USED_RING + 8 * (pos & mask))
            if slot >= self.depth or not in_flight[slot]:
                raise RuntimeError(f"used id {slot} was not in flight")
            if length != want or st[st_off + slot]:
                raise RuntimeError(f"slot {slot}: used length {length}, status "
                                   f"{st[st_off + slot]:#x}")
            in_flight[slot] = 0
            out.append(slot)
            pos += 1
        self.last_used = pos & 0xFFFF
        self.outstanding -= n
        # EVENT_IDX: interrupt at the next used element.
        _U16.pack_into(self._avail, self._avail_off + used_event_offset(self.size),
                       self.last_used)
        return out
