"""A popped descriptor chain: its buffers as (gpa, length) pairs, and its queue generation.

`generation` is the generation of the queue the chain was popped from (set by
`SplitQueue.pop`). A queue reset (QueueReady=0, QueueReset), a device reset (Status 0) and a
disconnect (guest memory detached) bump the queue's generation; a chain whose generation is no
longer the queue's belongs to a ring the driver has reclaimed, and completing it must not touch
guest memory (`SplitQueue.is_current`, `SplitQueue.add_used(..., generation=)`; see
docs/architecture.md, "Queue generations").
"""

from __future__ import annotations

from vmmiod.memory import GuestMemory


class DescriptorChain:
    """One available chain, already walked and checked; buffers resolved on access.

    `readable` and `writable` hold (gpa, length) pairs in chain order. Views into guest memory
    are looked up only when asked for, so a guest that remaps memory between pop and use is
    caught by the memory layer's bounds checks at that moment. `generation` is the queue's
    generation at pop time (-1 for a chain built outside `pop`).
    """

    __slots__ = ("generation", "head", "memory", "readable", "readable_len", "writable",
                 "writable_len")

    def __init__(self, memory: GuestMemory, head: int, readable: list[tuple[int, int]],
                 writable: list[tuple[int, int]], readable_len: int, writable_len: int) -> None:
        self.memory = memory
        self.generation = -1
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def __repr__(self) -> str:
        return (f"DescriptorChain(head={self.head}, readable={self.readable}, "
                f"writable={self.writable})")

    def _views(self, bufs: list[tuple[int, int]], offset: int, length: int | None,
               writable: bool) -> list[memoryview]:
        out: list[memoryview] = []
        remaining = -1 if length is None else length
        mem = self.memory
        for gpa, blen in bufs:
            if remaining == 0:
                break
            if offset >= blen:
                offset -= blen
                continue
            take = blen - offset
            if 0 < remaining < take:
                take = remaining
            if take:
                out.extend(mem.views(gpa + offset, take, writable))
            if remaining > 0:
                remaining -= take
            offset = 0
        return out

    def readable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Views of the driver-written bytes [offset, offset+length) in chain order."""
        return self._views(self.readable, offset, length, False)

    def writable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Views of the device-writable space [offset, offset+length) in chain order."""
        return self._views(self.writable, offset, length, True)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """A copy of the readable bytes (for small headers and control messages)."""
        return b"".join(self.readable_views(offset, length))

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy `data` into the writable space from `offset`; returns bytes written."""
        pos = 0
        n = len(data)
        for v in self.writable_views(offset, n):
            k = len(v)
            v[:] = data[pos:pos + k]
            pos += k
        return pos
