"""The virtio-blk worker thread's side: the operations that may stall for milliseconds.

FLUSH (fdatasync), writethrough writes (their fdatasync), discard and write zeroes run here, on
one thread per device and in submission order, so the event loop (and the IOREQs of every other
device) never waits behind a slow disk. `Worker.run` takes one batch and returns one status per
request; the device completes them back on the loop.
"""

from __future__ import annotations

from vmmiod.devices.block_backend import Backing
from vmmiod.devices.block_request import (
    SECTOR_SHIFT,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    Request,
)

# What the worker does for a deferred request before its status is known.
KIND_SYNC, KIND_DISCARD, KIND_WRITE_ZEROES, KIND_WRITE_SYNC = range(4)
KIND_OPS = {KIND_SYNC: "flush", KIND_DISCARD: "discard", KIND_WRITE_ZEROES: "write_zeroes",
            KIND_WRITE_SYNC: "write_sync"}
Deferred = tuple[Request, int, int]  # request, used length, kind
Result = tuple[int, OSError | None]  # status, the error behind an IOERR


class Worker:
    def __init__(self, backing: Backing, counters: dict[str, int]) -> None:
        self.backing = backing
        self.counters = counters  # only "flushes" is written from the worker thread
        # After a failed fdatasync the kernel may have dropped the dirty pages (and marked them
        # clean): a later fdatasync that succeeds would promise data that is gone. So the
        # failure is sticky: every later sync of this image fails too.
        self.flush_error: OSError | None = None

    def run(self, work: list[Deferred], writethrough: bool) -> list[Result]:
        """Ranges in order, then one fdatasync covering the whole batch.

        One fdatasync serves every FLUSH and writethrough write of the batch: each of them
        covers only writes completed before it, and all of those were done before this ran.
        """
        results: list[Result] = []
        need_sync = False
        b = self.backing
        for req, _used, kind in work:
            try:
                if kind == KIND_DISCARD:
                    for sector, count, _flags in req.ranges or ():
                        b.discard(sector << SECTOR_SHIFT, count << SECTOR_SHIFT)
                elif kind == KIND_WRITE_ZEROES:
                    for sector, count, flags in req.ranges or ():
                        b.write_zeroes(sector << SECTOR_SHIFT, count << SECTOR_SHIFT,
                                       bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
                    need_sync = need_sync or writethrough
                else:
                    need_sync = True
                results.append((VIRTIO_BLK_S_OK, None))
            except OSError as exc:
                results.append((VIRTIO_BLK_S_IOERR, exc))
        if need_sync:
            err = self.flush_error
            if err is None:
                try:
                    b.flush()
                except OSError as exc:
                    err = self.flush_error = exc
            self.counters["flushes"] += 1
            if err is not None:
                for i, (_req, _used, kind) in enumerate(work):
                    if results[i][1] is None and (kind in (KIND_SYNC, KIND_WRITE_SYNC) or (
                            kind == KIND_WRITE_ZEROES and writethrough)):
                        results[i] = (VIRTIO_BLK_S_IOERR, err)
        return results
