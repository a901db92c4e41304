"""Guest-side driver model of a split virtqueue, shaped like Linux's virtio_ring.c.

Builds descriptor tables, avail and used rings in guest memory the way the Linux driver does
(free list threaded through `next`, direct and indirect chains, EVENT_IDX), so tests, property
tests, the simulated guest and the benchmarks state the guest's side plainly. It is also the
tool for hostile tests: `raw_*` methods write any value anywhere in the rings.

This is the guest's code: it trusts nothing from the device either (used ids are checked).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from vmmiod import barrier
from vmmiod.memory import GuestMemory

# The split ring as the guest sees it, written from the VIRTIO 1.2 spec (section 2.7, "Split
# Virtqueues") and deliberately not taken from the device side (vmmiod/virtqueue/): the two are
# compared by tests/test_vring_sides.py, so a mistake one side makes is caught by the other.
# All fields are little-endian.

# struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }  (2.7.5)
VIRTQ_DESC = struct.Struct("<QIHH")
VIRTQ_DESC_SIZE = VIRTQ_DESC.size
VIRTQ_DESC_F_NEXT = 1  # the buffer continues in the descriptor `next`
VIRTQ_DESC_F_WRITE = 2  # the device writes this buffer (otherwise it only reads it)
VIRTQ_DESC_F_INDIRECT = 4  # the buffer is a table of descriptors (2.7.5.3)

# struct virtq_avail { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }  (2.7.6)
VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # without EVENT_IDX: the driver asks for no used interrupts
AVAIL_FLAGS, AVAIL_IDX, AVAIL_RING = 0, 2, 4
AVAIL_ENTRY = 2

# struct virtq_used_elem { le32 id; le32 len; };
# struct virtq_used { le16 flags; le16 idx; struct virtq_used_elem ring[size]; le16 avail_event; }
# (2.7.8)
VIRTQ_USED_ELEM = struct.Struct("<II")
VIRTQ_USED_F_NO_NOTIFY = 1  # without EVENT_IDX: the device asks for no available notifications
USED_FLAGS, USED_IDX, USED_RING = 0, 2, 4

# Alignment of each part in guest memory (2.7, "Virtqueue Part Alignment").
DESC_TABLE_ALIGN, AVAIL_RING_ALIGN, USED_RING_ALIGN = 16, 2, 4


def used_event_offset(size: int) -> int:
    """Offset of `used_event` in the available ring: just after its `size` entries."""
    return AVAIL_RING + AVAIL_ENTRY * size


def avail_event_offset(size: int) -> int:
    """Offset of `avail_event` in the used ring: just after its `size` elements."""
    return USED_RING + VIRTQ_USED_ELEM.size * size


def avail_ring_bytes(size: int) -> int:
    return used_event_offset(size) + 2


def used_ring_bytes(size: int) -> int:
    return avail_event_offset(size) + 2


def need_event(event: int, new: int, old: int) -> bool:
    """EVENT_IDX (2.7.7, 2.7.10): moving an index from `old` to `new` calls for a notification
    iff it moved past `event`, i.e. old <= event < new, counted modulo 2**16."""
    return (event - old) % 0x10000 < (new - old) % 0x10000


Buffer = tuple[int, int]  # (gpa, length)


class Allocator:
    """A bump allocator over a guest-physical range, with a free list per exact size."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.end = base + size
        self.top = base
        self._free: dict[int, list[int]] = {}

    def alloc(self, size: int, align: int = 16) -> int:
        size = max(size, 1)
        bucket = self._free.get(size)
        if bucket:
            for i, gpa in enumerate(bucket):
                if gpa % align == 0:
                    return bucket.pop(i)
        gpa = (self.top + align - 1) // align * align
        if gpa + size > self.end:
            raise MemoryError(f"guest allocator exhausted ({size} bytes wanted)")
        self.top = gpa + size
        return gpa

    def free(self, gpa: int, size: int) -> None:
        self._free.setdefault(max(size, 1), []).append(gpa)


class DriverQueue:
    """One virtqueue as the guest driver sees it."""

    def __init__(self, memory: GuestMemory, alloc: Allocator, size: int, *, index: int = 0,
                 event_idx: bool = False, indirect: bool = False,
                 legacy_align: int | None = None) -> None:
        self.memory = memory
        self.alloc = alloc
        self.size = size
        self.index = index
        self.event_idx = event_idx
        self.use_indirect = indirect
        if legacy_align is None:
            self.desc_addr = alloc.alloc(VIRTQ_DESC_SIZE * size, DESC_TABLE_ALIGN)
            self.avail_addr = alloc.alloc(avail_ring_bytes(size), AVAIL_RING_ALIGN)
            self.used_addr = alloc.alloc(used_ring_bytes(size), USED_RING_ALIGN)
        else:
            # Legacy layout (virtio 0.9.5 / mmio v1): one contiguous area, used ring aligned.
            avail_end = VIRTQ_DESC_SIZE * size + avail_ring_bytes(size)
            used_off = (avail_end + legacy_align - 1) // legacy_align * legacy_align
            total = used_off + used_ring_bytes(size)
            self.desc_addr = alloc.alloc(total, max(legacy_align, 4096))
            self.avail_addr = self.desc_addr + VIRTQ_DESC_SIZE * size
            self.used_addr = self.desc_addr + used_off
        zero = bytes(VIRTQ_DESC_SIZE * size)
        memory.write(self.desc_addr, zero)
        memory.write(self.avail_addr, bytes(avail_ring_bytes(size)))
        memory.write(self.used_addr, bytes(used_ring_bytes(size)))
        self.free_head = 0
        self.num_free = size
        for i in range(size):
            self._write_desc(i, 0, 0, 0, (i + 1) % size)
        self.avail_idx = 0  # shadow of avail.idx
        self._published_idx = 0  # avail.idx at the last kick_prepare
        self.last_used = 0
        self._tokens: dict[int, tuple[Any, int, int | None, int]] = {}  # head -> token, ndesc, table, tsize

    # -- raw access (hostile tests) -------------------------------------------------------------
    def _write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int,
                    table: int | None = None) -> None:
        base = self.desc_addr if table is None else table
        buf, off = self.memory.locate(base + VIRTQ_DESC_SIZE * i, VIRTQ_DESC_SIZE, True)
        VIRTQ_DESC.pack_into(buf, off, addr, length, flags, nxt)

    def raw_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self._write_desc(i, addr, length, flags, nxt)

    def raw_avail(self, slot: int, head: int) -> None:
        self.memory.write_u16(self.avail_addr + AVAIL_RING + AVAIL_ENTRY * (slot % self.size), head)

    def raw_avail_idx(self, idx: int) -> None:
        self.memory.write_u16(self.avail_addr + AVAIL_IDX, idx)

    def set_start_index(self, idx: int) -> None:
        """Start both rings at `idx` (tests of 16-bit wrap-around). Before the device activates."""
        self.avail_idx = self._published_idx = self.last_used = idx & 0xFFFF
        self.memory.write_u16(self.avail_addr + AVAIL_IDX, idx)
        self.memory.write_u16(self.used_addr + USED_IDX, idx)

    # -- adding buffers -------------------------------------------------------------------------
    def add(self, out: Sequence[Buffer], in_: Sequence[Buffer], token: Any = None,
            indirect: bool | None = None) -> int:
        """Expose driver-readable `out` then device-writable `in_` buffers as one chain."""
        total = len(out) + len(in_)
        if total == 0:
            raise ValueError("a chain needs at least one buffer")
        use_indirect = self.use_indirect if indirect is None else indirect
        use_indirect = use_indirect and total > 1 and self.num_free >= 1
        bufs = [(a, n, 0) for a, n in out] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in in_]
        if use_indirect:
            table = self.alloc.alloc(VIRTQ_DESC_SIZE * total, DESC_TABLE_ALIGN)
            for i, (a, n, fl) in enumerate(bufs):
                nxt = i + 1 if i + 1 < total else 0
                self._write_desc(i, a, n, fl | (VIRTQ_DESC_F_NEXT if i + 1 < total else 0),
                                 nxt, table)
            head = self.free_head
            self.free_head = self._desc_next(head)
            self._write_desc(head, table, VIRTQ_DESC_SIZE * total, VIRTQ_DESC_F_INDIRECT, 0)
            self.num_free -= 1
            self._tokens[head] = (token, 1, table, VIRTQ_DESC_SIZE * total)
        else:
            if self.num_free < total:
                raise BufferError(f"queue {self.index}: {total} descriptors wanted, "
                                  f"{self.num_free} free")
            head = i = self.free_head
            for k, (a, n, fl) in enumerate(bufs):
                nxt = self._desc_next(i)
                last = k + 1 == total
                self._write_desc(i, a, n, fl | (0 if last else VIRTQ_DESC_F_NEXT), nxt)
                if not last:
                    i = nxt
            self.free_head = self._desc_next(i)
            self.num_free -= total
            self._tokens[head] = (token, total, None, 0)
        self.raw_avail(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        # Like Linux's virtqueue_add_split: the index is published at once (ring entry first);
        # kick_prepare only decides whether the device needs a notification.
        barrier.wmb()
        self.memory.write_u16(self.avail_addr + AVAIL_IDX, self.avail_idx)
        return head

    def _desc_next(self, i: int) -> int:
        buf, off = self.memory.locate(self.desc_addr + VIRTQ_DESC_SIZE * i, VIRTQ_DESC_SIZE)
        nxt: int = VIRTQ_DESC.unpack_from(buf, off)[3]
        return nxt

    def kick_prepare(self) -> bool:
        """True if the device wants a notification for the entries added since the last kick."""
        barrier.mb()
        old, new = self._published_idx, self.avail_idx
        self._published_idx = new
        if self.event_idx:
            avail_event = self.memory.read_u16(self.used_addr + avail_event_offset(self.size))
            return need_event(avail_event, new, old)
        return not self.memory.read_u16(self.used_addr + USED_FLAGS) & VIRTQ_USED_F_NO_NOTIFY

    # -- used buffers ---------------------------------------------------------------------------
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_addr + USED_IDX)

    def get_used(self) -> tuple[Any, int] | None:
        """The next used (token, length), or None; frees the chain's descriptors."""
        if self.last_used == self.used_idx():
            return None
        barrier.rmb()
        slot = self.last_used % self.size
        buf, off = self.memory.locate(self.used_addr + USED_RING + VIRTQ_USED_ELEM.size * slot,
                                      VIRTQ_USED_ELEM.size)
        head, length = VIRTQ_USED_ELEM.unpack_from(buf, off)
        if head not in self._tokens:
            raise RuntimeError(f"device returned head {head}, which the driver did not expose")
        token, ndesc, table, tsize = self._tokens.pop(head)
        # Thread the chain back into the free list.
        i = head
        for _ in range(ndesc - 1):
            i = self._desc_next(i)
        self._write_desc(i, 0, 0, 0, self.free_head)
        self.free_head = head
        self.num_free += ndesc
        if table is not None:
            self.alloc.free(table, tsize)
        self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.memory.write_u16(self.avail_addr + used_event_offset(self.size), self.last_used)
        return token, length

    def drain_used(self) -> list[tuple[Any, int]]:
        out = []
        while (u := self.get_used()) is not None:
            out.append(u)
        return out

    def disable_interrupts(self) -> None:
        if not self.event_idx:
            self.memory.write_u16(self.avail_addr + AVAIL_FLAGS, VIRTQ_AVAIL_F_NO_INTERRUPT)

    def enable_interrupts(self) -> None:
        if self.event_idx:
            self.memory.write_u16(self.avail_addr + used_event_offset(self.size), self.last_used)
        else:
            self.memory.write_u16(self.avail_addr + AVAIL_FLAGS, 0)

    def pending(self) -> int:
        return len(self._tokens)
