"""The device side of a split virtqueue (VIRTIO 1.2, section 2.7), hostile-driver safe.

Sans-IO: a SplitQueue reads and writes rings in a GuestMemory and nothing else. Every value it
reads from the guest is untrusted; every rule it enforces raises a named VirtqueueError
(vmmiod/virtqueue/errors.py), and the walk of any chain is bounded by the table sizes.
"""

from __future__ import annotations

import itertools
import struct

from vmmiod import barrier
from vmmiod.memory import GuestMemory, GuestMemoryError, store_u16
from vmmiod.virtqueue.batch import DESC, BatchOps
from vmmiod.virtqueue.chain import DescriptorChain
from vmmiod.virtqueue.errors import (
    AvailIndexJump,
    ChainLengthOverflow,
    ChainTooLong,
    HeadInFlight,
    HeadOutOfRange,
    IndirectBadLength,
    IndirectNotNegotiated,
    IndirectWithNext,
    InvalidQueueSize,
    MisalignedRing,
    NestedIndirect,
    NextOutOfRange,
    QueueNotReady,
    ReadableAfterWritable,
    RingAccessError,
    RingOutsideMemory,
    UsedIdNotInFlight,
)
from vmmiod.virtqueue.fastwalk import (
    FAST_TABLE_MAX,
    READERS,
    TABLE_STRUCTS,
    NotThisShape,
    linear_reader,
)

MAX_QUEUE_SIZE = 32768

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16
USED_ELEM = struct.Struct("<II")  # id, len
U16 = struct.Struct("<H")
MAX_INDIRECT = 65536  # an indirect table holds at most 2**16 descriptors (its next is a u16)
LEN_LIMIT = 1 << 32

DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4

# Generations are unique across every queue of the process, so a chain can never pass for one
# of another SplitQueue object either.
_generations = itertools.count(1)


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    return 6 + 2 * size  # flags, idx, ring[size], used_event


def used_ring_size(size: int) -> int:
    return 6 + 8 * size  # flags, idx, ring[size], avail_event


def vring_need_event(event: int, new: int, old: int) -> bool:
    """VIRTIO 1.2 2.7.10: notify iff `event` lies in the half-open window (old, new]."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class SplitQueue(BatchOps):
    """Device side of one split virtqueue (its batch pop and used writer: batch.py)."""

    def __init__(self, max_size: int, index: int = 0) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} is not a power of two in 1..32768")
        self.index = index
        self.max_size = max_size
        self.generation = 0  # set by reset(): never 0 afterwards
        self.stale_dropped = 0  # completions of an older generation dropped by add_used
        self.reset()

    # -- configuration --------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the initial state; a new generation (chains popped before are stale)."""
        self.generation = next(_generations)
        self.size = self.max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.ready = False
        self.event_idx = False
        self.indirect = False
        self.memory: GuestMemory | None = None
        self.next_avail = 0
        self.next_used = 0
        self._avail_idx = 0  # avail.idx as last read
        self._signalled_used = 0
        self._signalled_valid = False
        self._in_flight = bytearray(0)
        self._gen = -1
        # Drop the ring views: a lazy mapper (Xen) can unmap only what nobody references.
        self._desc_buf = self._avail_buf = self._used_buf = memoryview(b"")
        self._desc_off = self._avail_off = self._used_off = 0

    def check_config(self) -> None:
        """Size and alignment rules that need no memory (2.7: sizes, 2.7.5-2.7.8 alignment)."""
        n = self.size
        if not 1 <= n <= self.max_size or n & (n - 1):
            raise InvalidQueueSize(
                f"queue {self.index}: size {n} is not a power of two in 1..{self.max_size}")
        if self.desc_addr % DESC_ALIGN:
            raise MisalignedRing(
                f"queue {self.index}: descriptor table {self.desc_addr:#x} not 16-byte aligned")
        if self.avail_addr % AVAIL_ALIGN:
            raise MisalignedRing(
                f"queue {self.index}: avail ring {self.avail_addr:#x} not 2-byte aligned")
        if self.used_addr % USED_ALIGN:
            raise MisalignedRing(
                f"queue {self.index}: used ring {self.used_addr:#x} not 4-byte aligned")

    def activate(self, memory: GuestMemory, *, event_idx: bool = False,
                 indirect: bool = False) -> None:
        """Check the configuration against guest memory and start serving the queue."""
        self.check_config()
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect
        self._map_rings()
        self._in_flight = bytearray(self.size)
        self.ready = True

    def set_indices(self, next_avail: int, next_used: int) -> None:
        """Resume at given ring indexes (migration, restart, wrap-around tests)."""
        self.next_avail = self._avail_idx = next_avail & 0xFFFF
        self.next_used = self._signalled_used = next_used & 0xFFFF

    def _map_rings(self) -> None:
        mem = self.memory
        assert mem is not None
        n = self.size
        try:
            self._desc_buf, self._desc_off = mem.locate(self.desc_addr, desc_table_size(n))
            self._avail_buf, self._avail_off = mem.locate(self.avail_addr, avail_ring_size(n))
            self._used_buf, self._used_off = mem.locate(self.used_addr, used_ring_size(n), True)
        except GuestMemoryError as exc:
            self.ready = False
            raise RingOutsideMemory(f"queue {self.index}: {exc}") from exc
        self._gen = mem.generation

    def _check_generation(self) -> None:
        mem = self.memory
        if mem is None or not self.ready:
            raise QueueNotReady(f"queue {self.index}: not ready")
        if mem.generation != self._gen:
            self._map_rings()

    # -- avail ring -----------------------------------------------------------------------------
    def avail_idx(self) -> int:
        """Read avail.idx (one read per batch) and check the distance rule."""
        idx: int = U16.unpack_from(self._avail_buf, self._avail_off + 2)[0]
        if ((idx - self.next_avail) & 0xFFFF) > self.size:
            raise self._avail_jump(idx)
        barrier.rmb()  # ring entries after the index that covers them
        self._avail_idx = idx
        return idx

    def _avail_jump(self, idx: int) -> AvailIndexJump:
        """The queue stops: the driver's avail.idx ran more than a ring ahead."""
        self.ready = False
        return AvailIndexJump(f"queue {self.index}: avail.idx {idx} is more than {self.size} "
                              f"ahead of {self.next_avail}")

    def has_available(self) -> bool:
        self._check_generation()
        return self._avail_idx != self.next_avail or self.avail_idx() != self.next_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Reads avail.idx only when the cached one is used up."""
        mem = self.memory
        if mem is None or not self.ready or mem.generation != self._gen:
            self._check_generation()
            assert mem is not None
        nxt_avail = self.next_avail
        n = self.size
        if self._avail_idx == nxt_avail:  # avail_idx(), written out: once per pop that drains
            idx: int = U16.unpack_from(self._avail_buf, self._avail_off + 2)[0]
            if idx == nxt_avail:
                return None
            if ((idx - nxt_avail) & 0xFFFF) > n:
                raise self._avail_jump(idx)
            barrier.rmb()  # ring entries after the index that covers them
            self._avail_idx = idx
        head: int = U16.unpack_from(self._avail_buf,
                                    self._avail_off + 4 + 2 * (nxt_avail & (n - 1)))[0]
        if head >= n:
            raise HeadOutOfRange(f"queue {self.index}: head {head} >= size {n}")
        addr, length, flags, nxt = DESC.unpack_from(self._desc_buf,
                                                    self._desc_off + DESC_SIZE * head)
        chain = None
        if (flags == VIRTQ_DESC_F_INDIRECT and self.indirect and length
                and not length & (DESC_SIZE - 1) and length <= DESC_SIZE * FAST_TABLE_MAX):
            # The usual indirect chain: the table read in one go and matched against the shape
            # a driver builds (fastwalk.py); anything else takes the full walk, which names the
            # rule it breaks.
            try:
                tbuf, tbase = mem.locate(addr, length)
            except GuestMemoryError as exc:
                raise RingAccessError(f"queue {self.index}: indirect table: {exc}") from exc
            vals = TABLE_STRUCTS[length >> 4].unpack_from(tbuf, tbase)
            key = vals[2::4]
            reader = READERS.get(key) or linear_reader(key)
            if reader is not None:
                try:
                    chain = reader(vals, mem, head)
                except NotThisShape:
                    pass
        elif not flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
            # A chain of one direct descriptor (receive buffers, console): nothing to walk, and
            # a u32 length cannot overflow the chain length.
            if flags & VIRTQ_DESC_F_WRITE:
                chain = DescriptorChain(mem, head, [], [(addr, length)], 0, length)
            else:
                chain = DescriptorChain(mem, head, [(addr, length)], [], length, 0)
        if chain is None:
            chain = self._walk_from(head, addr, length, flags, nxt)
        if self._in_flight[head]:
            raise HeadInFlight(f"queue {self.index}: head {head} is already in flight")
        self.next_avail = (nxt_avail + 1) & 0xFFFF
        self._in_flight[head] = 1
        chain.generation = self.generation
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        """Walk the chain at `head` descriptor by descriptor (every rule checked)."""
        n = self.size
        if head >= n:
            raise HeadOutOfRange(f"queue {self.index}: head {head} >= size {n}")
        addr, length, flags, nxt = DESC.unpack_from(self._desc_buf,
                                                    self._desc_off + DESC_SIZE * head)
        return self._walk_from(head, addr, length, flags, nxt)

    def _walk_from(self, head: int, addr: int, length: int, flags: int,
                   nxt: int) -> DescriptorChain:
        """The full walk, from the head descriptor's fields (already read)."""
        mem = self.memory
        assert mem is not None
        buf, base = self._desc_buf, self._desc_off
        table_size = budget = self.size
        in_indirect = False
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        rlen = wlen = 0
        unpack = DESC.unpack_from
        while True:
            if budget == 0:
                raise ChainTooLong(f"queue {self.index}: chain from head {head} loops")
            budget -= 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise IndirectNotNegotiated(f"queue {self.index}: INDIRECT_DESC not negotiated")
                if in_indirect:
                    raise NestedIndirect(f"queue {self.index}: indirect inside indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise IndirectWithNext(f"queue {self.index}: INDIRECT together with NEXT")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise IndirectBadLength(f"queue {self.index}: indirect table length {length}")
                try:
                    buf, base = mem.locate(addr, length)
                except GuestMemoryError as exc:
                    raise RingAccessError(f"queue {self.index}: indirect table: {exc}") from exc
                table_size = budget = length // DESC_SIZE
                in_indirect = True
                addr, length, flags, nxt = unpack(buf, base)
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
                wlen += length
            else:
                if writable:
                    raise ReadableAfterWritable(
                        f"queue {self.index}: readable descriptor after a writable one")
                readable.append((addr, length))
                rlen += length
            if rlen + wlen >= LEN_LIMIT:
                raise ChainLengthOverflow(f"queue {self.index}: chain length exceeds 2**32-1")
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_size:
                raise NextOutOfRange(f"queue {self.index}: next {nxt} >= {table_size}")
            addr, length, flags, nxt = unpack(buf, base + DESC_SIZE * nxt)
        return DescriptorChain(mem, head, readable, writable, rlen, wlen)

    def undo_pop(self, chain: DescriptorChain) -> None:
        """Give back `chain`, the last one popped (a buffer the backend could not take now).

        Steps back with the chain itself, never by re-reading the avail slot: the driver may
        have rewritten that slot since, and its head would be some other chain's. A chain of
        an older generation (the queue was reset since) is ignored.
        """
        if chain.generation != self.generation:
            return
        self.next_avail = (self.next_avail - 1) & 0xFFFF
        self._in_flight[chain.head] = 0

    # -- generations ----------------------------------------------------------------------------
    def is_current(self, chain: DescriptorChain | int) -> bool:
        """True if `chain` (or a generation taken from one) belongs to this queue as it is now.

        False after a queue reset, device reset or disconnect since the pop: the driver has
        reclaimed the chain's buffers, so its completion must not touch guest memory.
        """
        gen = chain if isinstance(chain, int) else chain.generation
        return gen == self.generation

    # -- used ring ------------------------------------------------------------------------------
    def add_used(self, head: int, length: int, generation: int | None = None) -> bool:
        """Write a used element (not yet visible to the driver until publish_used).

        With `generation` (the popped chain's), a completion of an older generation is
        dropped without writing anything (counted in `stale_dropped`) and False is returned.
        """
        if generation is not None and generation != self.generation:
            self.stale_dropped += 1
            return False
        in_flight = self._in_flight
        if not 0 <= head < len(in_flight) or not in_flight[head]:
            raise UsedIdNotInFlight(f"queue {self.index}: head {head} is not in flight")
        in_flight[head] = 0
        nxt_used = self.next_used
        USED_ELEM.pack_into(self._used_buf, self._used_off + 4 + 8 * (nxt_used & (self.size - 1)),
                            head, length)
        self.next_used = (nxt_used + 1) & 0xFFFF
        return True

    def complete(self, chain: DescriptorChain, length: int) -> bool:
        """`add_used` for a popped chain: a stale one (older generation) is dropped, False."""
        return self.add_used(chain.head, length, chain.generation)

    def publish_used(self) -> bool:
        """Make added elements visible (element before idx); True if the driver wants an interrupt."""
        mem = self.memory
        if not self.ready:
            return False
        if mem is None or mem.generation != self._gen:
            self._check_generation()
        barrier.wmb()
        new = self.next_used
        store_u16(self._used_buf, self._used_off + 2, new)  # one store, never 0 in passing
        barrier.mb()  # the idx store before reading the driver's suppression state
        if self.event_idx:
            old = self._signalled_used
            valid = self._signalled_valid
            self._signalled_used = new
            self._signalled_valid = True
            if valid and old == new:
                return False
            used_event: int = U16.unpack_from(
                self._avail_buf, self._avail_off + 4 + 2 * self.size)[0]
            # vring_need_event(used_event, new, old), written out (once per batch, every batch)
            return not valid or ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        flags: int = U16.unpack_from(self._avail_buf, self._avail_off)[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def in_flight(self) -> int:
        return sum(self._in_flight)

    # -- driver notifications -------------------------------------------------------------------
    def disable_notification(self) -> None:
        """Ask the driver not to notify while the device is draining (no-op with EVENT_IDX)."""
        if not self.event_idx:
            self._check_generation()
            store_u16(self._used_buf, self._used_off, VIRTQ_USED_F_NO_NOTIFY)

    def enable_notification(self) -> bool:
        """Ask for the next notification; True if buffers arrived meanwhile (drain again)."""
        mem = self.memory
        if mem is None or not self.ready or mem.generation != self._gen:
            self._check_generation()
        if self.event_idx:
            store_u16(self._used_buf, self._used_off + 4 + 8 * self.size, self.next_avail)
        else:
            store_u16(self._used_buf, self._used_off, 0)
        barrier.mb()
        idx: int = U16.unpack_from(self._avail_buf, self._avail_off + 2)[0]
        if idx == self.next_avail:  # nothing new: no entry will be read, no check or barrier
            self._avail_idx = idx
            return False
        return self.avail_idx() != self.next_avail
