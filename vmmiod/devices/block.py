"""virtio-blk (VIRTIO 1.2, 5.2): a guest disk on a raw image file or a host block device.

Six parts, Firecracker-style: this module (lifecycle, the queue loop, counters), `block_config`
(feature bits and the config space), `block_request` (the single parse step that names every
rule a request can break), `block_backend` (the image: size, lock, O_DIRECT, hole punching),
`block_io` (requests as engine ops, completions in batches) and the engine itself
(vmmiod/blockio/: io_uring, a thread pool, or the inline `sync` engine; `io_engine` in the
config). Reads and writes go straight between the image and guest memory; every request popped
in one notification is submitted at once and handed to the kernel by one kick, so a guest at
queue depth 32 gets the disk's parallelism, and no read, write or fdatasync waits on the event
loop (docs/performance.md has the figures).
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from vmmiod.blockio import READ, WRITE, Op, UringUnavailable, open_engine
from vmmiod.config import BlockConfig, GuestConfig
from vmmiod.devices.base import BackendError
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
from vmmiod.devices.block_fast import handle_tables
from vmmiod.devices.block_io import BlockIo, Pending
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
from vmmiod.memory import GuestMemory
from vmmiod.virtqueue import DescriptorChain, SplitQueue

LOG_FIRST = 10  # guest-caused warnings logged in full, then one in LOG_EVERY
LOG_EVERY = 1000


class BlockDevice(BlockIo):
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
        self.engine = None
        # After a failed fdatasync the kernel may have dropped the dirty pages (and marked them
        # clean): a later fdatasync that succeeds would promise data that is gone. So the
        # failure is sticky: every later sync of this image fails too.
        self.flush_error = None
        self._flush_error_logged = False
        self._inflight_q = [0] * nqueues
        self._sticky: list[Pending] = []
        self._log_counts: dict[str, int] = {}
        # The engine's: overflow flushes, missed wake-ups, inline reads, polls (blockio/poll.py)
        self._engine_counts = (0, 0, 0, 0, 0, 0)
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
        try:
            self.engine, fallback = open_engine(self.cfg.io_engine, self._completed,
                                                   self.cfg.io_poll_us * 1000)
        except UringUnavailable as exc:
            b.close()
            raise BackendError(
                f"block device {self.name!r}: io_engine io_uring is not available here "
                f"({exc.strerror}); set 'io_engine: auto' or 'threads' for this device") from exc
        self.engine.lone = self._completed_one  # a lone completion answered first (lone.py)
        self.log.info("block_io_engine", engine=self.engine.name, requested=self.cfg.io_engine,
                      fallback_reason=fallback)
        self.log.info("block_opened", path=str(self.cfg.path), size=b.size,
                      block_device=b.is_block_device, cache=self.cfg.cache, direct=b.direct,
                      readonly=self.cfg.readonly, queues=len(self.queue_max_sizes))

    async def close(self) -> None:
        if self.backing.fd < 0:
            return
        if self.engine is not None:
            self.engine.close()  # waits for what is in flight; nothing is delivered any more
            self._keep_engine_counts()  # for the stats logged once the engine is gone
            self.engine = None
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.backing.close)
        except OSError as exc:
            self.log.error("block_close_failed", errno=exc.errno, error=exc.strerror)
        self.log.info("block_closed", **self.stats())

    def stats(self) -> dict[str, int]:
        out = super().stats()
        (out["io_overflow_flushes"], out["io_missed_wakeups"], out["io_inline_reads"],
         out["io_poll_hits"], out["io_poll_misses"], out["io_poll_us"]) = self._keep_engine_counts()
        return out

    def _keep_engine_counts(self) -> tuple[int, int, int, int, int, int]:
        """The engine's own counts, read while it exists and kept after close."""
        e = self.engine
        if e is not None:
            poll = e.poll  # io_uring only (blockio/poll.py)
            hits, misses, spent = ((poll.hits, poll.misses, poll.spent_ns // 1000)
                                   if poll is not None else (0, 0, 0))
            self._engine_counts = (e.overflow_flushes, e.missed_wakeups, e.inline_reads,
                                   hits, misses, spent)
        return self._engine_counts

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
        self.state_changed()

    # -- lifecycle ------------------------------------------------------------------------------
    def on_activate(self) -> None:
        if self.engine is not None:
            self.engine.attach(self._loop)
        # A driver that cannot flush must get durable writes (5.2.6.3: without FLUSH the
        # device behaves as writethrough).
        self._writethrough = not self.writeback or not self.has_feature(VIRTIO_BLK_F_FLUSH)

    def on_reset(self) -> None:
        # Reads still running could write guest memory the adaptor is about to unmap: cancel
        # them and wait. Whatever completes later is of an older generation and is dropped.
        self._cancel(None)
        if not self.active:  # a real reset, not a fault: config returns to its initial state
            self.writeback = self.cfg.cache != "writethrough"

    def on_queue_reset(self, index: int) -> None:
        """QueueReady=0 / QueueReset: the queue's reads and writes in flight are cancelled (and
        waited for); whatever still completes carries the old queue generation and is dropped."""
        super().on_queue_reset(index)
        self._cancel(index)

    # -- restart (docs/restart.md) --------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        return {"writeback": self.writeback}

    def import_state(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("writeback"), bool):
            self.writeback = state["writeback"]
            self.on_activate()

    def resume(self, chains: dict[int, list[DescriptorChain]]) -> None:
        """Requests the dead daemon had in flight are done again: reads and writes are
        idempotent, a FLUSH is redone (it covers every write completed before it)."""
        if self.limits is not None and self.memory is not None:
            for index, found in chains.items():
                for chain in found:
                    self._handle(index, self.queues[index], self.memory, self.limits, chain)
                if found:
                    self._end_batch(index, True)
        super().resume({})

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
        pop, drained = q.pop, q.drained
        engine = self.engine
        assert engine is not None
        while True:
            if not q.event_idx:  # with EVENT_IDX there is nothing to disable
                q.disable_notification()
            while budget:
                chain = pop()  # (reads avail.idx when what it read last is used up)
                if chain is None:
                    break
                handle(index, q, memory, limits, chain)
                budget -= 1
                if drained():  # (QD1) no pop that finds nothing: enable_notification re-reads
                    engine.flush()  # the disk starts before the notification bookkeeping
                    break
                if budget:  # the run behind it: the common requests in one pass (block_fast)
                    budget -= handle_tables(self, index, q, memory, limits, budget)
                    if drained():
                        break
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
        self._end_batch(index, q.next_used != used_before)

    def _reschedule(self, index: int) -> None:
        assert self._loop is not None
        if index not in self._pending:
            self._pending.add(index)
            self._loop.call_soon(self._run_queue, index)

    def _handle(self, index: int, q: SplitQueue, mem: GuestMemory, limits: Limits,
                chain: DescriptorChain) -> None:
        """One request: parse, then its ops to the engine (or an answer at once)."""
        try:
            req = parse(chain, limits)
        except RequestError as exc:
            self._reject(q, mem, chain, exc)
            return
        t = req.type
        c = self.counters
        if t == VIRTIO_BLK_T_IN or t == VIRTIO_BLK_T_OUT:
            if t == VIRTIO_BLK_T_IN:
                c["requests_in"] += 1
                used = chain.writable_len
            else:
                c["requests_out"] += 1
                used = 1
            if req.data_len:  # one op straight between the image and guest memory
                write = t == VIRTIO_BLK_T_OUT
                data = req.data
                if len(data) == 1:
                    views = mem.views(data[0][0], data[0][1], not write)
                else:
                    views = []
                    for gpa, n in data:
                        views += mem.views(gpa, n, not write)
                b = self.backing
                offset, length = req.sector << SECTOR_SHIFT, req.data_len
                p = Pending(index, chain.generation, req, used, 1, write and self._writethrough)
                self._inflight_q[index] += 1
                if b.direct and not (offset | length) % b.direct_align:
                    op = Op(WRITE if write else READ, b.fd, views, offset, length, p, False, True)
                else:
                    op = Op(WRITE if write else READ, b.buffered_fd, views, offset, length, p)
                c["in_flight"] += 1
                engine = self.engine
                assert engine is not None
                engine.submit(op)
            else:  # nothing to transfer
                self._complete(q, mem, req.head, req.status_gpa, VIRTIO_BLK_S_OK, used)
        elif t == VIRTIO_BLK_T_FLUSH:
            c["requests_flush"] += 1
            self._submit_flush(index, chain.generation, req)
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
            self._submit_ranges(index, chain.generation, req)
        else:  # parse() lets through only the types above and WRITE_ZEROES
            c["requests_write_zeroes"] += 1
            self._submit_ranges(index, chain.generation, req)

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
        """The notification's ops go to the kernel at once; answers given inline are published."""
        engine = self.engine
        assert engine is not None
        engine.kick()  # (the sync engine and sans-IO use complete here, in a batch)
        if self._sticky:
            self._completed([])
        if added:  # without EVENT_IDX an empty publish would still interrupt the driver
            self.notify_used(index)


__all__ = [
    "TYPE_NAMES",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_UNSUPP",
    "BlockDevice",
    "default_serial",
]
