"""virtio-blk (VIRTIO 1.2, 5.2): a guest disk on a raw image file or a host block device.

Five parts, Firecracker-style: this module (lifecycle, the queue loop, completions, counters),
`block_config` (feature bits and the config space), `block_request` (the single parse step that
names every rule a request can break), `block_backend` (the image: size, lock, O_DIRECT,
preadv/pwritev, fdatasync, hole punching) and `block_worker` (what runs on the worker thread).

Where the blocking work runs was decided by measurement (`python -m vmmiod.bench.block`, its
"threading model" figures): reads and writes run inline on the event loop, straight between the
image and guest memory, because a page-cache preadv costs about 1 us while a hand-off to a
worker thread costs 35-50 us of CPU. The operations that can stall for milliseconds (fdatasync for
FLUSH and writethrough writes, hole punching and zeroing) run on one worker thread per device,
in submission order, so the IOREQs of the other devices are never held up behind them.
"""

from __future__ import annotations

import asyncio
import errno
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vmmiod.config import BlockConfig, GuestConfig
from vmmiod.devices.base import BackendError, VirtioDevice, queue_fault_reason
from vmmiod.devices.block_backend import IOV_MAX, Backing, ImageLocked
from vmmiod.devices.block_config import (  # noqa: F401  (feature names re-exported for users)
    BLK_CONFIG,
    CONFIG_WRITEBACK_OFFSET,
    MAX_RANGE_SECTORS,
    MAX_RANGES,
    SIZE_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
    blk_features,
    config_space,
    default_serial,
)
from vmmiod.devices.block_request import (
    ID_BYTES,
    SECTOR_SHIFT,
    TYPE_NAMES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Limits,
    Request,
    RequestError,
    UnsupportedType,
    parse,
)
from vmmiod.devices.block_worker import (
    KIND_DISCARD,
    KIND_OPS,
    KIND_SYNC,
    KIND_WRITE_SYNC,
    KIND_WRITE_ZEROES,
    Deferred,
    Worker,
)
from vmmiod.memory import GuestMemory, GuestMemoryError
from vmmiod.virtqueue import DescriptorChain, SplitQueue, VirtqueueError

LOG_FIRST = 10  # guest-caused warnings logged in full, then one in LOG_EVERY
LOG_EVERY = 1000


class BlockDevice(VirtioDevice):
    device_id = 2
    type_name = "block"

    def __init__(self, cfg: BlockConfig, guest: GuestConfig, *, access_platform: bool = False,
                 log: Any = None) -> None:
        nqueues = max(1, cfg.queues)
        super().__init__(cfg.id, [cfg.queue_size] * nqueues, access_platform=access_platform,
                         log=log)
        self.cfg = cfg
        serial = cfg.serial if cfg.serial is not None else default_serial(guest.name, cfg.id)
        self.serial_id = serial.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self.backing = Backing(cfg.path, readonly=cfg.readonly, cache=cfg.cache, lock=cfg.lock)
        self.limits: Limits | None = None
        self.writeback = cfg.cache != "writethrough"  # the config space's writeback field
        self._writethrough = not self.writeback  # effective mode while active
        self._worker = Worker(self.backing, self.counters)
        self._flush_error_logged = False
        self._executor: ThreadPoolExecutor | None = None
        self._plain_fd = -1
        self._deferred: list[list[Deferred]] = []
        self._log_counts: dict[str, int] = {}
        self.counters.update({
            "requests_in": 0, "requests_out": 0, "requests_flush": 0, "requests_get_id": 0,
            "requests_discard": 0, "requests_write_zeroes": 0, "requests_unsupported": 0,
            "bytes_read": 0, "bytes_written": 0, "errors": 0, "malformed": 0,
            "io_errors": 0, "enospc": 0, "eio": 0, "flushes": 0, "in_flight": 0,
            "stale_completions": 0,
        })

    # -- backend ---------------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            self.backing.open()
        except ImageLocked as exc:
            raise BackendError(
                f"block device {self.name!r}: image {self.cfg.path} is locked by another "
                f"process (another vmmiod or a VMM is using it); stop that process first, or "
                f"set 'lock: false' for this device if sharing the image is intended") from exc
        except OSError as exc:
            raise BackendError(f"block device {self.name!r}: cannot open {self.cfg.path}: "
                               f"{exc.strerror or exc}") from exc
        b = self.backing
        if b.direct_unavailable:
            self.log.warning("block_direct_io_unavailable", path=str(self.cfg.path))
        self.limits = Limits(
            capacity=b.size >> SECTOR_SHIFT, seg_max=self._seg_max(), size_max=SIZE_MAX,
            readonly=self.cfg.readonly, discard=not self.cfg.readonly,
            write_zeroes=not self.cfg.readonly, max_discard_sectors=MAX_RANGE_SECTORS,
            max_discard_seg=MAX_RANGES, max_write_zeroes_sectors=MAX_RANGE_SECTORS,
            max_write_zeroes_seg=MAX_RANGES)
        # The fd for the inline fast path: the buffered image (with O_DIRECT the backend decides).
        self._plain_fd = -1 if b.direct else b.buffered_fd
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"blk-{self.name}")
        self.log.info("block_opened", path=str(self.cfg.path), size=b.size,
                      block_device=b.is_block_device, cache=self.cfg.cache, direct=b.direct,
                      readonly=self.cfg.readonly, queues=len(self.queue_max_sizes))

    async def close(self) -> None:
        if self.backing.fd < 0:
            return
        executor, self._executor = self._executor, None
        self._plain_fd = -1
        try:
            if executor is not None:
                await asyncio.get_running_loop().run_in_executor(executor, self.backing.close)
                executor.shutdown(wait=True)
            else:
                self.backing.close()
        except OSError as exc:
            self.log.error("block_close_failed", errno=exc.errno, error=exc.strerror)
        self.log.info("block_closed", **self.stats())

    def _seg_max(self) -> int:
        # Header and status take two descriptors of a direct chain; preadv takes IOV_MAX.
        return max(1, min(self.cfg.queue_size - 2, IOV_MAX - 2))

    # -- features and config space -------------------------------------------------------------
    def device_features(self) -> int:
        return super().device_features() | blk_features(
            self.backing, readonly=self.cfg.readonly, queues=len(self.queue_max_sizes))

    def config_bytes(self) -> bytes:
        return config_space(self.backing, seg_max=self._seg_max(), writeback=self.writeback,
                            queues=len(self.queue_max_sizes))

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Only `writeback` is writable (CONFIG_WCE, 5.2.6.3): 0 writethrough, 1 writeback."""
        if offset != CONFIG_WRITEBACK_OFFSET or size != 1 or value not in (0, 1):
            self._warn("block_config_write_ignored", offset=offset, size=size, value=value)
            return
        self.writeback = bool(value)
        self._writethrough = not self.writeback or (
            self.active and not self.has_feature(VIRTIO_BLK_F_FLUSH))
        self.log.info("block_cache_mode_changed", writeback=self.writeback)

    # -- lifecycle ------------------------------------------------------------------------------
    def on_activate(self) -> None:
        self._deferred = [[] for _ in self.queues]
        # A driver that cannot flush must get durable writes (5.2.6.3: without FLUSH the
        # device behaves as writethrough).
        self._writethrough = not self.writeback or not self.has_feature(VIRTIO_BLK_F_FLUSH)

    def on_reset(self) -> None:
        # Work already on the worker thread comes back with an older queue generation (the
        # window resets every queue) and is dropped there; work not yet submitted goes now.
        self.counters["in_flight"] -= sum(len(d) for d in self._deferred)
        self._deferred = []
        if not self.active:  # a real reset, not a fault: config returns to its initial state
            self.writeback = self.cfg.cache != "writethrough"

    def on_queue_reset(self, index: int) -> None:
        """QueueReady=0 / QueueReset: requests of that queue still on the worker thread carry
        the old queue generation and are dropped when they come back; unsubmitted ones go now."""
        super().on_queue_reset(index)
        if index < len(self._deferred):
            self.counters["in_flight"] -= len(self._deferred[index])
            self._deferred[index] = []

    # -- the queue loop -------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        limits, memory = self.limits, self.memory
        if limits is None or memory is None:
            self.fault("block backend is not open", queue=index)
            return
        q = self.queues[index]
        used_before = q.next_used
        budget = q.size  # chains per turn: a guest that refills forever cannot starve the loop
        handle = self._handle
        pop = q.pop
        while True:
            if not q.event_idx:  # with EVENT_IDX there is nothing to disable
                q.disable_notification()
            while budget:
                chain = pop()
                if chain is None:
                    break
                handle(index, q, memory, limits, chain)
                budget -= 1
            if not budget:
                self._end_batch(index, q.next_used != used_before)
                if self._loop is not None:  # the rest on a later loop turn, after other work
                    self._reschedule(index)
                    return
                # No loop (sans-IO use by tests and benchmarks: the caller is the guest).
                budget, used_before = q.size, q.next_used
                continue
            if not q.enable_notification():
                break
        if self._deferred and self._deferred[index]:
            self._end_batch(index, q.next_used != used_before)
        elif q.next_used != used_before:  # _end_batch without deferred work, written out
            self.notify_used(index)

    def _reschedule(self, index: int) -> None:
        assert self._loop is not None
        if index not in self._pending:
            self._pending.add(index)
            self._loop.call_soon(self._run_queue, index)

    def _handle(self, index: int, q: SplitQueue, mem: GuestMemory, limits: Limits,
                chain: DescriptorChain) -> None:
        """One request: parse, then inline I/O or a place on the worker's list."""
        try:
            req = parse(chain, limits)
        except RequestError as exc:
            self._reject(q, mem, chain, exc)
            return
        t = req.type
        c = self.counters
        if t == VIRTIO_BLK_T_IN:
            c["requests_in"] += 1
            data, length = req.data, req.data_len
            if len(data) == 1:
                views = mem.views(data[0][0], data[0][1], True)
            else:
                views = []
                for gpa, n in data:
                    views += mem.views(gpa, n, True)
            try:
                # Buffered image, one call: the common case without the backend's wrappers.
                # A short or refused (EFAULT) transfer is redone in full by the backend
                # (idempotent); the try is written out here, a call costs as much as the check.
                pfd = self._plain_fd
                n = -1
                if pfd >= 0 and len(views) <= IOV_MAX:
                    try:
                        n = os.preadv(pfd, views, req.sector << SECTOR_SHIFT)
                    except OSError as exc:
                        if exc.errno != errno.EFAULT:
                            raise
                if n != length:
                    self.backing.readv(views, req.sector << SECTOR_SHIFT, length)
                status = VIRTIO_BLK_S_OK
                c["bytes_read"] += length
            except OSError as exc:
                status = self._io_error("read", exc, req)
                c["errors"] += 1
            buf, off = mem.locate(req.status_gpa, 1, True)
            buf[off] = status
            q.add_used(req.head, chain.writable_len)
        elif t == VIRTIO_BLK_T_OUT:
            c["requests_out"] += 1
            data, length = req.data, req.data_len
            if len(data) == 1:
                views = mem.views(data[0][0], data[0][1], False)
            else:
                views = []
                for gpa, n in data:
                    views += mem.views(gpa, n, False)
            try:
                pfd = self._plain_fd
                n = -1
                if pfd >= 0 and len(views) <= IOV_MAX:
                    try:
                        n = os.pwritev(pfd, views, req.sector << SECTOR_SHIFT)
                    except OSError as exc:
                        if exc.errno != errno.EFAULT:
                            raise
                if n != length:
                    self.backing.writev(views, req.sector << SECTOR_SHIFT, length)
            except OSError as exc:
                status = self._io_error("write", exc, req)
                c["errors"] += 1
            else:
                c["bytes_written"] += length
                if self._writethrough:
                    self._defer(index, req, KIND_WRITE_SYNC)
                    return
                status = VIRTIO_BLK_S_OK
            buf, off = mem.locate(req.status_gpa, 1, True)
            buf[off] = status
            q.add_used(req.head, 1)
        elif t == VIRTIO_BLK_T_FLUSH:
            c["requests_flush"] += 1
            self._defer(index, req, KIND_SYNC)
        elif t == VIRTIO_BLK_T_GET_ID:
            c["requests_get_id"] += 1
            pos = 0
            for gpa, n in req.data:
                mem.write(gpa, self.serial_id[pos:pos + n])
                pos += n
            self._complete(q, mem, req.head, req.status_gpa, VIRTIO_BLK_S_OK,
                           chain.writable_len)
        elif t == VIRTIO_BLK_T_DISCARD:
            c["requests_discard"] += 1
            self._defer(index, req, KIND_DISCARD)
        else:  # parse() lets through only the types above and WRITE_ZEROES
            c["requests_write_zeroes"] += 1
            self._defer(index, req, KIND_WRITE_ZEROES)

    def _complete(self, q: SplitQueue, mem: GuestMemory, head: int, status_gpa: int | None,
                  status: int, used_len: int) -> None:
        if status_gpa is not None:
            buf, off = mem.locate(status_gpa, 1, True)
            buf[off] = status
        if status != VIRTIO_BLK_S_OK:
            self.counters["errors"] += 1
        q.add_used(head, used_len)

    def _reject(self, q: SplitQueue, mem: GuestMemory, chain: DescriptorChain,
                exc: RequestError) -> None:
        """A request that broke a rule: its status, no I/O, a (rate-limited) warning."""
        if isinstance(exc, UnsupportedType):
            self.counters["requests_unsupported"] += 1
        else:
            self.counters["malformed"] += 1
            self._warn("block_request_malformed", rule=exc.rule, reason=str(exc),
                       head=chain.head, queue=q.index)
        used = 0 if exc.status_gpa is None else 1
        self._complete(q, mem, chain.head, exc.status_gpa, exc.status, used)

    def _io_error(self, op: str, exc: OSError, req: Request | None) -> int:
        c = self.counters
        c["io_errors"] += 1
        name = {errno.ENOSPC: "enospc", errno.EIO: "eio"}.get(exc.errno or 0)
        if name is not None:
            c[name] += 1
        self._warn("block_io_error", op=op, errno=exc.errno, error=exc.strerror,
                   sector=None if req is None else req.sector)
        return VIRTIO_BLK_S_IOERR

    def _warn(self, event: str, **kw: Any) -> None:
        """Guest-triggerable warnings: the first few in full, then one in LOG_EVERY."""
        n = self._log_counts.get(event, 0) + 1
        self._log_counts[event] = n
        if n <= LOG_FIRST or n % LOG_EVERY == 0:
            self.log.warning(event, occurrences=n, **kw)

    def _end_batch(self, index: int, added: bool) -> None:
        if self._deferred and self._deferred[index]:
            work, self._deferred[index] = self._deferred[index], []
            self._submit(index, work)
        if added:  # without EVENT_IDX an empty publish would still interrupt the driver
            self.notify_used(index)

    # -- deferred work: fdatasync, discard, write zeroes on the worker thread -------------------
    def _defer(self, index: int, req: Request, kind: int) -> None:
        used = 1
        self._deferred[index].append((req, used, kind))
        self.counters["in_flight"] += 1

    def _submit(self, index: int, work: list[Deferred]) -> None:
        # Every request of a batch was popped from this queue in its present generation
        # (on_queue_reset empties the list): the batch carries that generation.
        gen = self.queues[index].generation
        if self._loop is None or self._executor is None:  # no loop (sans-IO use): inline
            self._finish_deferred(index, gen, work, self._worker.run(work, self._writethrough))
            return
        fut = self._loop.run_in_executor(self._executor, self._worker.run, work,
                                         self._writethrough)
        fut.add_done_callback(
            lambda f: self._finish_deferred(index, gen, work, f.result()))

    def _finish_deferred(self, index: int, generation: int, work: list[Deferred],
                         results: list[tuple[int, OSError | None]]) -> None:
        """Back on the loop: write statuses, return the chains, interrupt once."""
        self.counters["in_flight"] -= len(work)
        if (not self.active or self.failed or index >= len(self.queues)
                or not self.queues[index].is_current(generation)):
            # The queue or the device was reset (or the memory detached) meanwhile: the driver
            # reclaimed these buffers, and a re-enabled queue may reuse the heads. Nothing is
            # written to guest memory.
            self.counters["stale_completions"] += len(work)
            return
        mem = self.memory
        assert mem is not None
        q = self.queues[index]
        try:
            for (req, used, kind), (status, exc) in zip(work, results):
                if exc is not None:
                    self._io_error(KIND_OPS[kind], exc, req)
                    if exc is self._worker.flush_error and not self._flush_error_logged:
                        self._flush_error_logged = True
                        self.log.error("block_flush_failed", errno=exc.errno,
                                       error=exc.strerror, sticky=True)
                self._complete(q, mem, req.head, req.status_gpa, status, used)
            self.notify_used(index)
        except (VirtqueueError, GuestMemoryError) as exc:
            self.fault(queue_fault_reason(index, exc), queue=index, error=type(exc).__name__)

    def stats(self) -> dict[str, int]:
        return dict(self.counters)


__all__ = [
    "TYPE_NAMES",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_UNSUPP",
    "BlockDevice",
    "default_serial",
]
