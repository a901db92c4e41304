"""What a split virtqueue writes down so that a new daemon can take it over (docs/restart.md).

A `QueueRecord` lives in bytes that outlive the process (a MAP_SHARED file in the runtime
directory, see vmmiod/state/): a store into it is in the page cache at once, so SIGKILL loses
nothing already stored. The queue updates it with single aligned stores on its hot path:

    pop(head)          F[head] = IN_FLIGHT
    add_used(head, n)  F[head] = DONE + n         (the used element is written, not published)
    publish_used()     (R_avail, R_pub) = (next_avail, new) in one store;
                       used.idx = new (guest-visible);
                       F[head] = FREE for every head of the batch; R_used = new
    undo_pop(head)     F[head] = FREE

Layout (little-endian): u16 R_avail, u16 R_pub, u16 R_used, u16 magic, then u64 F[max_size].

`recover()` rebuilds the queue from the record and the rings in guest memory, and is right
whichever two of those stores the process died between: heads at used ring positions
[R_used, used.idx) were published (their F entries are stale: cleared, and R_used moved on,
exactly as publish would have); the chains popped after the last publish sit at avail positions
R_avail.. with F set (the walk finds them); what is left with F set is owed to the driver: DONE
heads are published again with their length (their data is already in guest memory),
IN_FLIGHT heads are handed to the device to do again. A record that cannot explain the rings
(the guest's used.idx beyond anything the record was publishing, a published head it never had
in flight, indexes further apart than the ring) is older than the guest's state: `StaleRecord`,
never trusted.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from vmmiod.memory import store_u16, store_u32, store_u64
from vmmiod.virtqueue.errors import VirtqueueError

U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
HEAD_SIZE = 8
ENTRY = 8
MAGIC = 0x5152  # "RQ": the area was initialised
FREE, IN_FLIGHT, DONE = 0, 1, 2


class StaleRecord(VirtqueueError):
    """The record cannot explain the rings in guest memory: it is older than the guest."""

    rule = "stale_queue_record"


def area_size(max_size: int) -> int:
    return HEAD_SIZE + ENTRY * max_size


class QueueRecord:
    """The per-queue area; `buf` is a writable memoryview of exactly area_size(max_size)."""

    __slots__ = ("buf", "entries", "max_size", "unpublished")

    def __init__(self, buf: memoryview, max_size: int) -> None:
        if len(buf) != area_size(max_size):
            raise ValueError(f"queue record of {len(buf)} bytes for {max_size} entries")
        self.buf = buf
        self.max_size = max_size
        self.entries = buf[HEAD_SIZE:].cast("Q")
        self.unpublished: list[int] = []

    # -- hot path (one aligned store each) ---------------------------------------------------------
    def popped(self, head: int) -> None:
        self.entries[head] = IN_FLIGHT

    def done(self, head: int, length: int) -> None:
        self.entries[head] = DONE + length
        self.unpublished.append(head)

    def freed(self, head: int, next_avail: int) -> None:
        self.entries[head] = FREE
        ahead = (self.avail - next_avail) & 0xFFFF
        if 0 < ahead < 0x8000:  # never ahead of what is really popped
            store_u16(self.buf, 0, next_avail)

    def before_publish(self, next_avail: int, new_used: int) -> None:
        store_u32(self.buf, 0, next_avail | new_used << 16)

    def after_publish(self, used_idx: int) -> None:
        entries = self.entries
        for head in self.unpublished:
            entries[head] = FREE
        self.unpublished.clear()
        store_u16(self.buf, 4, used_idx)

    # -- whole-queue ---------------------------------------------------------------------------------
    @property
    def avail(self) -> int:
        return int(self.buf[0:2].cast("H")[0])

    @property
    def pub(self) -> int:
        return int(self.buf[2:4].cast("H")[0])

    @property
    def used(self) -> int:
        return int(self.buf[4:6].cast("H")[0])

    @property
    def valid(self) -> bool:
        return bool(self.buf[6:8].cast("H")[0] == MAGIC)

    def start(self, next_avail: int, next_used: int) -> None:
        """A queue enabled afresh: nothing in flight, indexes as given."""
        self.unpublished.clear()
        store_u16(self.buf, 6, 0)
        self.buf[HEAD_SIZE:] = bytes(ENTRY * self.max_size)
        store_u32(self.buf, 0, next_avail | next_used << 16)
        store_u16(self.buf, 4, next_used)
        store_u16(self.buf, 6, MAGIC)

    def clear(self) -> None:
        self.unpublished.clear()
        store_u16(self.buf, 6, 0)

    def snapshot(self) -> bytes:
        return bytes(self.buf)

    def set_entry(self, head: int, value: int) -> None:  # tests and recovery
        store_u64(self.buf, HEAD_SIZE + ENTRY * head, value)


class Recovered:
    """What `recover()` found: indexes to resume at and the chains still owed to the driver."""

    __slots__ = ("done", "in_flight", "next_avail", "used_idx")

    def __init__(self, next_avail: int, used_idx: int, done: list[tuple[int, int]],
                 in_flight: list[int]) -> None:
        self.next_avail = next_avail
        self.used_idx = used_idx
        self.done = done  # (head, used length) to publish again, in used-ring order
        self.in_flight = in_flight  # heads to hand to the device, in avail order


HeadAt = Callable[[int], int]
ElemAt = Callable[[int], tuple[int, int]]


def recover_rings(rec: QueueRecord, size: int, avail_buf: memoryview, avail_off: int,
                  used_buf: memoryview, used_off: int) -> Recovered:
    """`recover()` over the split ring layout (VIRTIO 1.2, 2.7.6 and 2.7.8) in guest memory."""
    mask = size - 1

    def head_at(pos: int) -> int:
        return int(U16.unpack_from(avail_buf, avail_off + 4 + 2 * (pos & mask))[0])

    def elem_at(pos: int) -> tuple[int, int]:
        head, length = USED_ELEM.unpack_from(used_buf, used_off + 4 + 8 * (pos & mask))
        return int(head), int(length)

    return recover(rec, size, int(U16.unpack_from(avail_buf, avail_off + 2)[0]),
                   int(U16.unpack_from(used_buf, used_off + 2)[0]), head_at, elem_at)


def recover(rec: QueueRecord, size: int, avail_idx: int, used_idx: int,
            avail_head_at: HeadAt, used_elem_at: ElemAt) -> Recovered:
    """Rebuild a queue of `size` entries from `rec` and the rings (see the module docstring).

    `avail_head_at(pos)` returns the head in avail ring position pos, `used_elem_at(pos)` the
    (id, len) at used ring position pos; both read guest memory (untrusted). The record is
    brought up to date in place, with the stores publish would have made, so a death during
    recovery is recovered from again. Raises StaleRecord when the record cannot be right.
    """
    if not rec.valid:
        raise StaleRecord("no valid record for this queue")
    entries = rec.entries
    r_avail, r_pub, r_used = rec.avail, rec.pub, rec.used
    publishing = (r_pub - r_used) & 0xFFFF
    published = (used_idx - r_used) & 0xFFFF
    if publishing > size or (r_avail - r_used) & 0xFFFF > size:
        raise StaleRecord(f"recorded indexes avail {r_avail}, publishing {r_pub}, used {r_used} "
                          "are more than a ring apart")
    if published > publishing:
        raise StaleRecord(f"the guest's used.idx {used_idx} is beyond what the record ever "
                          f"published ({r_pub}): the record is older than the guest's state")
    if (avail_idx - r_avail) & 0xFFFF > size:
        raise StaleRecord(f"avail.idx {avail_idx} is more than a ring ahead of the record's "
                          f"{r_avail}")
    for h in range(size, rec.max_size):
        if entries[h] != FREE:
            raise StaleRecord(f"head {h} in flight beyond the queue size {size}")
    heads = []
    for k in range(published):  # published while the last batch was going out: completed
        head, _len = used_elem_at((r_used + k) & 0xFFFF)
        if not 0 <= head < size:
            raise StaleRecord(f"used ring position {(r_used + k) & 0xFFFF} holds head {head}")
        heads.append(head)
    for head in heads:
        entries[head] = FREE
    store_u16(rec.buf, 4, used_idx)
    # Chains popped since the last publish: consecutive avail positions whose heads are owed.
    pos = r_avail
    for _ in range(size):
        if pos == avail_idx:
            break
        head = avail_head_at(pos)
        if not 0 <= head < size or entries[head] == FREE:
            break
        pos = (pos + 1) & 0xFFFF
    next_avail = pos
    store_u32(rec.buf, 0, next_avail | used_idx << 16)
    owed = [h for h in range(size) if entries[h] != FREE]
    if len(owed) > (next_avail - used_idx) & 0xFFFF:
        raise StaleRecord(f"{len(owed)} chains owed, but only {(next_avail - used_idx) & 0xFFFF}"
                          " popped and not used")
    # Done chains: in the order their used elements already sit after used.idx, if they do.
    done_heads = {h: int(entries[h]) - DONE for h in owed if entries[h] >= DONE}
    done: list[tuple[int, int]] = []
    seen: set[int] = set()
    for k in range(len(done_heads)):
        head, length = used_elem_at((used_idx + k) & 0xFFFF)
        if done_heads.get(head) != length or head in seen:
            break
        done.append((head, length))
        seen.add(head)
    done += [(h, n) for h, n in done_heads.items() if h not in seen]
    # In-flight chains: in the avail order still visible in the ring, then any others.
    order: list[int] = []
    pending = {h for h in owed if entries[h] == IN_FLIGHT}
    for k in range(size, 0, -1):
        head = avail_head_at((next_avail - k) & 0xFFFF)
        if head in pending:
            pending.discard(head)
            order.append(head)
    order += sorted(pending)
    return Recovered(next_avail, used_idx, done, order)
