"""The inflight record (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split-ring layout of the spec.

The back-end creates a shared buffer on GET_INFLIGHT_FD and records in it which heads it popped
and has not yet returned; the front-end keeps the fd and hands it back with SET_INFLIGHT_FD
after a reconnect, so a back-end that was killed and started again knows which requests to
redo (QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking").

One region per queue, each `queue_stride(queue_size)` bytes (the back-end chooses the layout;
only it reads the buffer):

    u64 features (0) | u16 version (1; 0 = never used) | u16 desc_num | u16 last_batch_head |
    u16 used_idx | desc_num x {u8 inflight, u8 pad[5], u16 next, u64 counter}

The buffer outlives us and comes back from the front-end: every value read from it is checked
like guest input (a head out of range or a batch list that loops makes it `InflightInvalid`).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

from vmmiod.hypervisors.vhost_user.memtable import check_memory_fd
from vmmiod.hypervisors.vhost_user.wire import Inflight, MessageError

HEAD = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC = struct.Struct("<B5xHQ")  # inflight, padding, next, counter
OFF_VERSION, OFF_DESC_NUM, OFF_LAST_BATCH, OFF_USED_IDX = 8, 10, 12, 14
DESC_NEXT, DESC_COUNTER = 6, 8
INFLIGHT_VERSION = 1
ALIGN = 64
MAX_QUEUES = 256
MAX_QUEUE_SIZE = 32768


class InflightInvalid(Exception):
    """The record does not add up (heads out of range, a batch list that loops)."""


def queue_stride(queue_size: int) -> int:
    size = HEAD.size + DESC.size * queue_size
    return (size + ALIGN - 1) // ALIGN * ALIGN


def check_shape(num_queues: int, queue_size: int, what: str) -> None:
    if not 1 <= num_queues <= MAX_QUEUES:
        raise MessageError("bad_inflight", f"{what}: {num_queues} queues (1 to {MAX_QUEUES})")
    if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
        raise MessageError("bad_inflight", f"{what}: queue size {queue_size} is not a power of "
                                           f"two up to {MAX_QUEUE_SIZE}")


# The per-request stores go through memoryview casts of the region (the host is little-endian:
# vmmiod/memory.py), indexed in their own units: a u16 index and a u64 index per field.
U16_LAST_BATCH, U16_USED_IDX = OFF_LAST_BATCH // 2, OFF_USED_IDX // 2
U16_NEXT = (HEAD.size + DESC_NEXT) // 2  # + DESC.size // 2 * head
U64_COUNTER = (HEAD.size + DESC_COUNTER) // 8  # + DESC.size // 8 * head


class QueueInflight:
    """One queue's part of the record."""

    def __init__(self, buf: memoryview, desc_num: int) -> None:
        self.buf = buf
        self.desc_num = desc_num
        self.counter = 1
        self._batch: list[int] = []
        self._h = buf.cast("H")
        self._q = buf.cast("Q")
        self._last_batch = 0  # the record's last_batch_head (read back at start())

    def _u16(self, off: int) -> int:
        value: int = struct.unpack_from("<H", self.buf, off)[0]
        return value

    def _set_u16(self, off: int, value: int) -> None:
        struct.pack_into("<H", self.buf, off, value & 0xFFFF)

    def start(self, ring_size: int, used_idx: int) -> tuple[int, list[int]] | None:
        """The ring starts with used.idx `used_idx`. A fresh record is initialised (None); a
        used one gives (next_avail, heads to resubmit in the order they were first popped)."""
        if ring_size > self.desc_num:
            raise InflightInvalid(f"ring of {ring_size} entries, record holds {self.desc_num}")
        if self._u16(OFF_VERSION) != INFLIGHT_VERSION:
            self.buf[:] = bytes(len(self.buf))
            self._set_u16(OFF_VERSION, INFLIGHT_VERSION)
            self._set_u16(OFF_DESC_NUM, self.desc_num)
            self._set_u16(OFF_USED_IDX, used_idx)
            self._last_batch = 0
            return None
        if self._u16(OFF_DESC_NUM) != self.desc_num:
            raise InflightInvalid(f"record was written for {self._u16(OFF_DESC_NUM)} entries, "
                                  f"not {self.desc_num}")
        recorded = self._u16(OFF_USED_IDX)
        if recorded != used_idx:
            # Killed between publishing a batch and clearing its marks: clear them now.
            head = self._u16(OFF_LAST_BATCH)
            for _ in range((used_idx - recorded) & 0xFFFF):
                if head >= self.desc_num:
                    raise InflightInvalid(f"batch list names head {head}")
                off = HEAD.size + DESC.size * head
                self.buf[off] = 0
                head = self._u16(off + DESC_NEXT)
            self._set_u16(OFF_USED_IDX, used_idx)
        pending: list[tuple[int, int]] = []
        top = 0
        for head in range(self.desc_num):
            flag, _, counter = DESC.unpack_from(self.buf, HEAD.size + DESC.size * head)
            if flag == 1:
                if head >= ring_size:
                    raise InflightInvalid(f"head {head} in flight on a ring of {ring_size}")
                pending.append((counter, head))
                top = max(top, counter)
            elif flag:
                raise InflightInvalid(f"head {head} has inflight mark {flag}")
        self.counter = top + 1
        self._last_batch = self._u16(OFF_LAST_BATCH)
        pending.sort()
        return (used_idx + len(pending)) & 0xFFFF, [h for _, h in pending]

    # The three per-request steps (the order of libvhost-user's, the stores as few as the
    # layout allows): the counter then the mark at the pop; the batch link at the add_used,
    # before used.idx moves; the marks cleared and used_idx recorded after it moved.
    def popped(self, head: int) -> None:
        self._q[U64_COUNTER + 2 * head] = self.counter
        self.counter += 1
        self.buf[HEAD.size + DESC.size * head] = 1

    def unpopped(self, head: int) -> None:
        self.buf[HEAD.size + DESC.size * head] = 0

    def used(self, head: int) -> None:
        h = self._h
        h[U16_NEXT + 8 * head] = self._last_batch
        h[U16_LAST_BATCH] = self._last_batch = head
        self._batch.append(head)

    def published(self, used_idx: int) -> None:
        """used.idx now reads `used_idx`: the batch is the driver's."""
        batch = self._batch
        if batch:
            buf = self.buf
            for head in batch:
                buf[HEAD.size + DESC.size * head] = 0
            batch.clear()
        self._h[U16_USED_IDX] = used_idx & 0xFFFF

    def release(self) -> None:
        self._h.release()
        self._q.release()
        self.buf.release()


class InflightRecord:
    """The whole buffer: created here (GET_INFLIGHT_FD) or handed back (SET_INFLIGHT_FD)."""

    def __init__(self, mapping: mmap.mmap, num_queues: int, queue_size: int) -> None:
        self.mapping = mapping
        self.num_queues = num_queues
        self.queue_size = queue_size
        stride = queue_stride(queue_size)
        view = memoryview(mapping)
        self.queues = [QueueInflight(view[i * stride:(i + 1) * stride], queue_size)
                       for i in range(num_queues)]

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> tuple[InflightRecord, int, Inflight]:
        """A zeroed memfd for the front-end to keep; returns (record, fd, its description)."""
        check_shape(num_queues, queue_size, "GET_INFLIGHT_FD")
        size = num_queues * queue_stride(queue_size)
        fd = os.memfd_create("vmmiod-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        return cls(mapping, num_queues, queue_size), fd, Inflight(size, 0, num_queues, queue_size)

    @classmethod
    def from_fd(cls, fd: int, info: Inflight) -> InflightRecord:
        what = "SET_INFLIGHT_FD"
        check_shape(info.num_queues, info.queue_size, what)
        need = info.num_queues * queue_stride(info.queue_size)
        if info.mmap_size < need:
            raise MessageError("bad_inflight", f"{what}: {info.mmap_size} bytes for "
                                               f"{info.num_queues} queues of {info.queue_size}, "
                                               f"{need} needed")
        if info.mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise MessageError("bad_inflight", f"{what}: offset {info.mmap_offset:#x} is not "
                                               "page aligned")
        check_memory_fd(fd, info.mmap_offset + need, what)
        try:
            mapping = mmap.mmap(fd, need, flags=mmap.MAP_SHARED, offset=info.mmap_offset)
        except (OSError, ValueError, OverflowError) as exc:
            raise MessageError("bad_inflight", f"{what}: cannot be mapped: {exc}") from exc
        return cls(mapping, info.num_queues, info.queue_size)

    def close(self) -> None:
        for q in self.queues:
            q.release()
        self.queues = []
        try:
            self.mapping.close()
        except BufferError:
            pass
