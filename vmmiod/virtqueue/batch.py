"""A notification's worth of the commonest chains, popped and completed in one pass each.

Linux's virtio-blk driver (and the benchmark's drivers) sends every request as one descriptor
pointing at an indirect table of three: header, data, status. `pop_tables` pops a run of such
chains with one read of the avail ring and one unpack per table, and returns each as the raw
values of its table; `add_used_run` writes the used elements of a batch with one store per
contiguous stretch of the used ring (and `add_used_publish` answers a lone one in one call).
Both are the rules of `SplitQueue.pop` / `add_used` written for a batch, never looser:

- `pop_tables` pops only from the avail entries the last read of avail.idx covers (by
  `SplitQueue.pop`, which the caller uses for a notification's first chain), at least
  BATCH_MIN of them.
- `pop_tables` takes only a chain `SplitQueue.pop` would accept with exactly the same buffers
  (head in range and not in flight, INDIRECT negotiated, the table inside guest memory, linear:
  descriptor i chains to i + 1, readable ones first, total length under 2**32). It stops, having
  popped nothing of it, at the first available chain of any other shape or breaking any rule;
  the caller then pops that one with `SplitQueue.pop`, which walks it in full and raises the
  named error. So a hostile entry in the middle of a batch is met exactly as before.
- `add_used_run` checks every head is in flight before writing any element.

`BatchOps` is a base class of SplitQueue (split.py): the same queue, its batch half; sans-IO.
"""

from __future__ import annotations

import struct

from vmmiod.memory import GuestMemory, GuestMemoryError
from vmmiod.virtqueue.errors import UsedIdNotInFlight
from vmmiod.virtqueue.fastwalk import (
    LEN_LIMIT,
    TABLE_STRUCTS,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

VIRTQ_DESC_F_INDIRECT = 4
DESC = struct.Struct("<QIHH")  # a descriptor (VIRTIO 1.2 2.7.5): addr, len, flags, next
DESC_SIZE = 16
TABLE_LEN = 3  # descriptors in the tables popped here
BATCH_MIN = 2  # fewer available chains: none popped here (the caller's pop() takes them)
_TABLE = TABLE_STRUCTS[TABLE_LEN]
_N, _NW, _W = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_WRITE
# The linear flag patterns of three descriptors: 0 to 3 readable ones, then writable ones.
LINEAR_FLAGS = frozenset({(_NW, _NW, _W), (_N, _NW, _W), (_N, _N, _W), (_N, _N, 0)})
_U16S: dict[int, struct.Struct] = {}
_USED: dict[int, struct.Struct] = {}

Table = tuple[int, tuple[int, ...]]  # head, the table's values (addr, len, flags, next) * 3


def _u16s(count: int) -> struct.Struct:
    s = _U16S.get(count)
    if s is None:
        s = _U16S[count] = struct.Struct(f"<{count}H")
    return s


def _used(count: int) -> struct.Struct:
    s = _USED.get(count)
    if s is None:
        s = _USED[count] = struct.Struct("<" + "II" * count)
    return s


class BatchOps:
    """The batch half of SplitQueue (which sets every attribute declared here)."""

    index: int
    size: int
    ready: bool
    indirect: bool
    memory: GuestMemory | None
    next_avail: int
    next_used: int
    _avail_idx: int
    _gen: int
    _in_flight: bytearray
    _desc_buf: memoryview
    _desc_off: int
    _avail_buf: memoryview
    _avail_off: int
    _used_buf: memoryview
    _used_off: int

    def avail_idx(self) -> int:
        raise NotImplementedError

    def _check_generation(self) -> None:
        raise NotImplementedError

    def add_used(self, head: int, length: int, generation: int | None = None) -> bool:
        raise NotImplementedError

    def publish_used(self) -> bool:
        raise NotImplementedError

    def add_used_publish(self, head: int, length: int) -> bool:
        """`add_used` then `publish_used`, for a lone completion: one call where a subclass
        writes the two out (vhost-user's VhostQueue); True if the driver wants an interrupt."""
        self.add_used(head, length)
        return self.publish_used()

    def drained(self) -> bool:
        """True when every chain the last read of avail.idx covered has been popped and no other
        chain is owed (a subclass adds its redo queue). The caller may then skip `pop`'s read
        of avail.idx that would find nothing and go to `enable_notification`, which re-reads it
        behind a full fence (VIRTIO 1.2 2.7.10) and so finds whatever came meanwhile."""
        return self._avail_idx == self.next_avail

    def pop_tables(self, limit: int) -> list[Table]:
        """Pop up to `limit` available chains that are one INDIRECT descriptor over a linear
        table of three; each as (head, the table's 12 values). Stops before the first chain of
        another shape (or breaking a rule): see the module doc."""
        out: list[Table] = []
        nxt_avail = self.next_avail
        # Only the entries avail.idx, as last read, already covers: pop() reads the index
        # (a notification's first chain comes from pop(), the rest of the run from here).
        count = (self._avail_idx - nxt_avail) & 0xFFFF
        if count < BATCH_MIN or not self.indirect:  # one chain: pop() costs less than a batch
            return out
        count = min(count, limit)
        mem = self.memory
        if mem is None or not self.ready or mem.generation != self._gen:
            self._check_generation()
            assert mem is not None
        n = self.size
        slot = nxt_avail & (n - 1)
        avail, ring = self._avail_buf, self._avail_off + 4
        first = min(count, n - slot)  # the avail ring wraps after its last slot
        heads = _u16s(first).unpack_from(avail, ring + 2 * slot)
        if first < count:
            heads += _u16s(count - first).unpack_from(avail, ring)
        desc, dbase = self._desc_buf, self._desc_off
        in_flight = self._in_flight
        locate, unpack_desc, unpack_table = mem.locate, DESC.unpack_from, _TABLE.unpack_from
        table_len = DESC_SIZE * TABLE_LEN
        for head in heads:
            if head >= n or in_flight[head]:
                break
            addr, length, flags, _ = unpack_desc(desc, dbase + DESC_SIZE * head)
            if flags != VIRTQ_DESC_F_INDIRECT or length != table_len:
                break
            try:
                tbuf, tbase = locate(addr, table_len)
            except GuestMemoryError:
                break  # pop() raises the named error for it
            v = unpack_table(tbuf, tbase)
            if (v[3] != 1 or v[7] != 2 or (v[2], v[6], v[10]) not in LINEAR_FLAGS
                    or v[1] + v[5] + v[9] >= LEN_LIMIT):
                break
            in_flight[head] = 1  # (a head twice in one batch: the second is met as in flight)
            out.append((head, v))
        self.next_avail = (nxt_avail + len(out)) & 0xFFFF
        return out

    def add_used_run(self, elems: list[int]) -> None:
        """Write used elements: `elems` is head, length, head, length... in completion order.
        Every head must be in flight (UsedIdNotInFlight before any element is written).
        Not visible to the driver until `publish_used`."""
        in_flight = self._in_flight
        size = len(in_flight)
        heads = elems[0::2]
        for head in heads:  # (a head twice: the second is not in flight any more)
            if not 0 <= head < size or not in_flight[head]:
                raise UsedIdNotInFlight(f"queue {self.index}: head {head} is not in flight")
            in_flight[head] = 0
        count = len(heads)
        nxt = self.next_used
        slot = nxt & (self.size - 1)
        first = min(count, self.size - slot)  # the used ring wraps after its last slot
        buf, ring = self._used_buf, self._used_off + 4
        _used(first).pack_into(buf, ring + 8 * slot, *elems[:2 * first])
        if first < count:
            _used(count - first).pack_into(buf, ring, *elems[2 * first:])
        self.next_used = (nxt + count) & 0xFFFF
