"""virtio-blk requests on the block I/O engine (vmmiod/blockio/): submission and completion.

Every request that touches the image becomes one or more engine ops, tagged with its queue and
that queue's generation; `process_queue` submits a notification's worth and kicks the engine
once (one io_uring_enter; O_DIRECT ops already go in groups of 4 as they come). Completions
come back in batches on the event loop; each batch ends with at most one used-ring publication
(and interrupt decision) per queue.

The rules kept from the inline design:
- FLUSH is an fdatasync submitted as a barrier: it starts only once every op submitted before
  it has finished, so it covers every write completed before the FLUSH arrived (and every write
  submitted before it).
- Writethrough: a write (or write zeroes) completes only after an fdatasync that started after
  the write finished; the writes finishing in one completion batch share one fdatasync.
- A failed fdatasync is sticky: the kernel may have dropped the dirty pages, so every later
  FLUSH and writethrough write of this image fails too.
- Discard punches a hole (a filesystem that cannot: the hint is dropped); write zeroes punches
  (UNMAP) or zeroes a range, and falls back to the backend's slower ways on a helper thread.
- Every request carries the queue generation of its chain (vmmiod/virtqueue/, docs/architecture.md
  "Queue generations"); a completion of an older generation (queue reset, device reset,
  disconnect) is dropped without touching guest memory. Reads and writes in flight are
  cancelled and waited for at the reset itself, so the kernel never writes buffers the driver
  has reclaimed or the adaptor has unmapped.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from vmmiod.blockio import CALL, FALLOCATE, FSYNC, READ, WRITE, Engine, Op
from vmmiod.devices.base import VirtioDevice
from vmmiod.devices.block_backend import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Backing,
)
from vmmiod.devices.block_request import (
    SECTOR_SHIFT,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    Request,
)
from vmmiod.memory import GuestMemory, GuestMemoryError
from vmmiod.virtqueue import DescriptorChain, VirtqueueError

UNSUPPORTED = (-errno.EOPNOTSUPP, -errno.ENOTTY, -errno.ENOSYS)
OP_NAMES = {VIRTIO_BLK_T_IN: "read", VIRTIO_BLK_T_OUT: "write", VIRTIO_BLK_T_FLUSH: "flush",
            VIRTIO_BLK_T_DISCARD: "discard"}


class Pending:
    """A request handed to the engine: where it completes, and what is still out."""

    __slots__ = ("error", "gen", "parts", "queue", "req", "sync", "used")

    def __init__(self, queue: int, gen: int, req: Request, used: int, parts: int = 1,
                 sync: bool = False) -> None:
        self.queue = queue
        self.gen = gen
        self.req = req
        self.used = used
        self.parts = parts  # ops not yet finished (discard / write zeroes: one per range)
        self.sync = sync  # writethrough: an fdatasync before the status
        self.error: OSError | None = None


class BlockIo(VirtioDevice):
    """The engine side of BlockDevice (a base class so that block.py stays one job)."""

    backing: Backing
    engine: Engine | None
    flush_error: OSError | None
    _writethrough: bool
    _inflight_q: list[int]
    _flush_error_logged: bool
    _sticky: list[Pending]  # failed by the sticky flush error: completed at the batch's end

    # -- submission (from process_queue) ---------------------------------------------------------
    def _submit_flush(self, index: int, gen: int, req: Request) -> None:
        assert self.engine is not None
        p = Pending(index, gen, req, 1)
        self.counters["in_flight"] += 1
        self._inflight_q[index] += 1
        if self.flush_error is not None:  # sticky: no fdatasync can promise anything now
            self.counters["flushes"] += 1
            p.error = self.flush_error
            self._sticky.append(p)
            return
        self.engine.submit(Op(FSYNC, self.backing.buffered_fd, owner=p, barrier=True, mode=1))

    def _submit_ranges(self, index: int, gen: int, req: Request) -> None:
        """DISCARD and WRITE_ZEROES: one fallocate per range."""
        assert self.engine is not None
        ranges = req.ranges or []
        discard = req.type == VIRTIO_BLK_T_DISCARD
        p = Pending(index, gen, req, 1, parts=len(ranges),
                    sync=not discard and self._writethrough)
        self.counters["in_flight"] += 1
        self._inflight_q[index] += 1
        fd = self.backing.buffered_fd
        for sector, count, flags in ranges:
            unmap = discard or bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE)
            self.engine.submit(Op(FALLOCATE, fd, None, sector << SECTOR_SHIFT,
                                  count << SECTOR_SHIFT, owner=p, mode=mode))

    # -- completion (on the loop, in batches) ----------------------------------------------------
    def _completed(self, ops: list[Op]) -> None:
        if not self.active or self.failed or self.memory is None:
            return  # reset meanwhile: these requests belong to nobody now
        if len(ops) == 1 and self._completed_one(ops[0]):
            return
        touched: set[int] = set()
        syncs: list[Pending] = []
        queues, mem, c = self.queues, self.memory, self.counters
        # The queues' generations, read once per batch (nothing in here resets a queue).
        gens = [q.generation for q in queues]
        ngens = len(gens)
        inflight_q = self._inflight_q
        locate = mem.locate
        n_fast = read_bytes = written_bytes = 0
        # The used elements of the plain completions, per queue: written in one store per
        # contiguous stretch of the used ring at the end (SplitQueue.add_used_run).
        runs: dict[int, list[int]] = {}
        try:
            for op in ops:
                p = op.owner
                if type(p) is not Pending:  # the fdatasync of writethrough requests (a list)
                    err = self._sync_result(op)
                    for w in p:
                        if w.error is None:
                            w.error = err
                        if self._current(w):
                            self._finish(w, touched)
                    continue
                index = p.queue
                if index >= ngens or gens[index] != p.gen:
                    self.counters["stale_completions"] += 1
                    continue  # an older generation of its queue: nothing is written
                res = op.result
                if op.kind <= WRITE and res >= 0 and not p.sync:  # the common case, written out
                    req = p.req
                    n_fast += 1
                    inflight_q[index] -= 1
                    if op.kind == READ:
                        read_bytes += res
                    else:
                        written_bytes += res
                    buf, off = locate(req.status_gpa, 1, True)
                    buf[off] = VIRTIO_BLK_S_OK
                    run = runs.get(index)
                    if run is None:
                        run = runs[index] = []
                    run += (req.head, p.used)
                    continue
                if op.kind == FALLOCATE and res in UNSUPPORTED:
                    if p.req.type == VIRTIO_BLK_T_DISCARD:
                        res = 0  # the filesystem cannot punch holes: the hint is dropped
                    else:
                        self._zeroes_fallback(op)
                        continue
                elif op.kind == FSYNC:
                    err = self._sync_result(op)
                    res = 0 if err is None else -(err.errno or errno.EIO)
                    if err is not None and p.error is None:
                        p.error = err
                if res < 0 and p.error is None:
                    p.error = self._op_error(op, res)
                p.parts -= 1
                if p.parts > 0:
                    continue
                if p.error is None and p.sync:
                    syncs.append(p)
                    continue
                self._finish(p, touched)
            if n_fast:
                c["in_flight"] -= n_fast
                c["bytes_read"] += read_bytes
                c["bytes_written"] += written_bytes
                n_fast = 0
                for index, run in runs.items():
                    if len(run) == 2:  # one element: the plain writer costs less
                        queues[index].add_used(run[0], run[1])
                    else:
                        queues[index].add_used_run(run)
                    touched.add(index)
            sticky = self._sticky
            if sticky:
                for p in sticky:
                    if self._current(p):
                        self._finish(p, touched)
                sticky.clear()
            if syncs:
                self._sync(syncs, touched)
            for index in touched:
                self.notify_used(index)
        except (VirtqueueError, GuestMemoryError) as exc:
            if n_fast:  # the counters of what completed before the fault
                c["in_flight"] -= n_fast
                c["bytes_read"] += read_bytes
                c["bytes_written"] += written_bytes
            self.fault(f"{exc}", error=type(exc).__name__)
            return
        assert self.engine is not None
        self.engine.kick()

    def _completed_one(self, op: Op) -> bool:
        """A lone plain read or write that transferred everything (queue depth 1): the batch
        path's common case without its per-batch set-up, answered first (status, used element,
        publish, interrupt) and counted after. Also the io_uring engine's `lone` hook
        (blockio/lone.py), called straight from its wake-up. False when it is anything else (an
        error, writethrough, another kind, a stale queue, a sticky failure waiting, a device
        reset meanwhile): the batch path takes it."""
        p = op.owner
        res = op.result
        if (type(p) is not Pending or op.kind > WRITE or res < 0 or p.sync or self._sticky
                or not self.active or self.failed):
            return False
        index = p.queue
        queues = self.queues
        if index >= len(queues) or queues[index].generation != p.gen:
            return False
        mem = self.memory
        assert mem is not None
        c = self.counters
        self._inflight_q[index] -= 1  # (before a fault, whose reset counts what is left)
        c["in_flight"] -= 1
        req = p.req
        try:
            buf, off = mem.locate(req.status_gpa, 1, True)
            buf[off] = VIRTIO_BLK_S_OK
            self.notify_used_one(index, req.head, p.used)
        except (VirtqueueError, GuestMemoryError) as exc:
            self.fault(f"{exc}", error=type(exc).__name__)
        c["bytes_read" if op.kind == READ else "bytes_written"] += res
        return True  # (nothing submitted here: no kick, unlike the batch path's syncs)

    def _op_error(self, op: Op, res: int) -> OSError:
        if op.error is not None:  # a worker exception that is not an OSError (issue 15 item 7)
            self.log.error("block_worker_exception", error=repr(op.error))
            return OSError(errno.EIO, f"worker exception: {op.error!r}")
        return OSError(-res, os.strerror(-res))

    def _zeroes_fallback(self, op: Op) -> None:
        """ZERO_RANGE / PUNCH_HOLE refused: the backend's other ways, on a helper thread."""
        assert self.engine is not None
        b, offset, length = self.backing, op.offset, op.length
        unmap = bool(op.mode & FALLOC_FL_PUNCH_HOLE)
        self.engine.submit(Op(CALL, owner=op.owner,
                              fn=lambda: b.write_zeroes(offset, length, unmap)))

    def _sync(self, waiters: list[Pending], touched: set[int]) -> None:
        """One fdatasync for the writethrough requests that finished in this batch."""
        assert self.engine is not None
        if self.flush_error is not None:
            self.counters["flushes"] += 1
            for p in waiters:
                p.error = self.flush_error
                self._finish(p, touched)  # (current: checked in this batch)
            return
        self.engine.submit(Op(FSYNC, self.backing.buffered_fd, owner=waiters, mode=1))

    def _sync_result(self, op: Op) -> OSError | None:
        self.counters["flushes"] += 1
        if op.result >= 0:
            return self.flush_error  # set meanwhile by another sync: still sticky
        err = self._op_error(op, op.result)
        if self.flush_error is None:
            self.flush_error = err
        if not self._flush_error_logged:
            self._flush_error_logged = True
            self.log.error("block_flush_failed", errno=err.errno, error=err.strerror,
                           sticky=True)
        return self.flush_error

    def _current(self, p: Pending) -> bool:
        """The request's queue is still the one it was popped from (no reset since)."""
        if p.queue < len(self.queues) and self.queues[p.queue].is_current(p.gen):
            return True
        self.counters["stale_completions"] += 1
        return False

    def _finish(self, p: Pending, touched: set[int]) -> None:
        """Status and used element of a current request (the caller checked _current)."""
        mem = self.memory
        assert mem is not None
        req = p.req
        c = self.counters
        c["in_flight"] -= 1
        self._inflight_q[p.queue] -= 1
        if p.error is not None:
            status = self._io_error(OP_NAMES.get(req.type, "write_zeroes"), p.error, req)
        else:
            status = VIRTIO_BLK_S_OK
            if req.type == VIRTIO_BLK_T_IN:
                c["bytes_read"] += req.data_len
            elif req.type == VIRTIO_BLK_T_OUT:
                c["bytes_written"] += req.data_len
        self._complete(self.queues[p.queue], mem, req.head, req.status_gpa, status, p.used)
        touched.add(p.queue)

    # -- cancellation ----------------------------------------------------------------------------
    def _cancel(self, index: int | None) -> None:
        """Drop the requests of queue `index` (None: all), waiting until none of their reads or
        writes can still touch guest memory."""
        if self.engine is None:
            return

        def match(op: Op) -> bool:
            o = op.owner
            if isinstance(o, list):
                return index is None
            return index is None or bool(o.queue == index)

        self.engine.cancel(match)
        counts = self._inflight_q
        for i in range(len(counts)) if index is None else (index,):
            if i < len(counts):  # their completions are dropped: stale from now on
                self.counters["in_flight"] -= counts[i]
                self.counters["stale_completions"] += counts[i]
                counts[i] = 0
        self._sticky[:] = [p for p in self._sticky if index is not None and p.queue != index]

    # -- provided by BlockDevice ------------------------------------------------------------------
    def _handle(self, index: int, q: Any, mem: GuestMemory, limits: Any,
                chain: DescriptorChain) -> None:
        raise NotImplementedError

    def _complete(self, q: Any, mem: GuestMemory, head: int, status_gpa: int | None,
                  status: int, used_len: int) -> None:
        raise NotImplementedError

    def _io_error(self, op: str, exc: OSError, req: Request | None) -> int:
        raise NotImplementedError


__all__ = ["VIRTIO_BLK_S_IOERR", "BlockIo", "Pending"]
