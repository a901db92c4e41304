"""The io_uring engine: every op of a batch in one io_uring_enter, completions in batches.

Reads and writes go to the ring as READ/WRITE (one buffer: no iovec to build) or READV/WRITEV;
fdatasync as FSYNC with IORING_FSYNC_DATASYNC; fallocate as FALLOCATE where the kernel offers
it (IORING_REGISTER_PROBE), else on a helper thread, like the blocking calls. The ring's
completions signal the engine's eventfd (IORING_REGISTER_EVENTFD), which the event loop watches:
one wake-up reaps every completion posted by then. The buffers an entry points at (guest memory,
the iovec array, a bounce buffer) are held by the Op until its completion is reaped.

Batching has one exception: O_DIRECT reads and writes are handed to the kernel every
SUBMIT_EVERY entries as they are queued, so that a disk is not left idle while the rest of a
large notification is parsed (the kick then submits what is left).

The eventfd is not the whole story: a completion the kernel put on its overflow list signals
nothing (vmmiod/blockio/uring.py). So every reap also looks at IORING_SQ_CQ_OVERFLOW and flushes
the list, and while completions are owed a watchdog looks at the ring every WATCHDOG_S: a
completion that is there (or overflowed) without a wake-up is reaped then, and counted in
`missed_wakeups`. Without it, a guest's I/O that the kernel overflowed waits forever.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import time

from vmmiod import barrier
from vmmiod.blockio import uring
from vmmiod.blockio.engine import Engine, Handler
from vmmiod.blockio.inline import read_inline
from vmmiod.blockio.lone import reap_lone
from vmmiod.blockio.op import FALLOCATE, FSYNC, READ, WRITE, Op
from vmmiod.blockio.poll import POLL_MAX_NS, AdaptivePoll
from vmmiod.blockio.uring import CQE_SIZE, SQE_SIZE, U32, Ring, UringUnavailable

_pack_sqe = uring.SQE.pack_into

REQUIRED_OPS = (uring.IORING_OP_READV, uring.IORING_OP_WRITEV, uring.IORING_OP_FSYNC)
DEFAULT_ENTRIES = 256
CANCEL_ROOM = 64  # CQ entries kept free for cancels' own completions
WATCHDOG_S = 0.05  # how often the ring is looked at while completions are owed
# O_DIRECT reads and writes go to the kernel in groups of this many, not only at the kick: the
# disk works on the first ones while the device parses the rest of the notification. (Buffered
# ones, which the page cache mostly completes inside io_uring_enter, wait for the kick: one
# system call per notification.) docs/performance.md has the measurements behind the 4.
SUBMIT_EVERY = 4
# Completions are polled for (blockio/poll.py) only with at most this many owed, the newest an
# O_DIRECT read or write: a deep queue keeps the loop busy anyway, and its completions come in
# batches long after a poll would end.
POLL_DEPTH = 2


class UringEngine(Engine):
    name = "io_uring"

    poll: AdaptivePoll

    def __init__(self, handler: Handler, entries: int = DEFAULT_ENTRIES,
                 poll_max_ns: int = POLL_MAX_NS) -> None:
        super().__init__(handler, threads=1)  # one helper thread for blocking calls
        try:
            self.ring = Ring(entries)
        except BaseException:
            os.close(self.efd)
            raise
        try:
            ops = self.ring.probe()
            missing = [uring.OP_NAMES[o] for o in REQUIRED_OPS if o not in ops]
            if missing:
                raise UringUnavailable(errno.EOPNOTSUPP,
                                       f"io_uring lacks {', '.join(missing)}")
            self.ring.register_eventfd(self.efd)
        except BaseException:
            self.ring.close()
            os.close(self.efd)
            raise
        self.ops = ops
        self._single = uring.IORING_OP_READ in ops and uring.IORING_OP_WRITE in ops
        self._fallocate = uring.IORING_OP_FALLOCATE in ops
        self._tags: dict[int, Op] = {}
        self._next_tag = 1
        self._backlog: list[Op] = []  # no free SQE or CQE: started when there is
        # Completions the kernel owes us. Kept at most the CQ's size: an overflowed CQE would
        # wait in the kernel's list, and only an io_uring_enter (not the eventfd) brings it.
        self._owed = 0
        self._owed_max = max(1, self.ring.cq_entries - CANCEL_ROOM)
        self._watchdog: asyncio.TimerHandle | None = None
        self._reaped_at_check = 0
        self._reaped = 0  # CQEs reaped so far (the watchdog sees whether wake-ups came)
        self.poll = AdaptivePoll(poll_max_ns)
        self._poll_from = 0  # perf_counter_ns of the submission a poll may look for, or 0
        self._poll_handle: asyncio.Handle | None = None
        self._quiet = False  # the eventfd's signals are off while a poll is scheduled
        # The newest entry is an O_DIRECT read or write: only those are polled for. A buffered
        # one the page cache cannot answer goes to an io-wq worker thread, which needs the CPU
        # a poll would take (on a small machine, the very CPU that would complete it).
        self._poll_direct = False

    def offered(self) -> list[str]:
        return sorted(uring.OP_NAMES[o] for o in self.ops if o in uring.OP_NAMES)

    # -- the hot path: one plain read or write, one buffer -----------------------------------
    def submit(self, op: Op) -> None:
        """A read or write of one buffer goes straight to an SQE (one pack_into); everything
        else (ordering, iovecs, a full ring, helper-thread work) takes the general path. A
        buffered read the page cache answers in full is done inline first (blockio/inline.py)."""
        if op.kind == READ and not op.direct and read_inline(self, op):
            return
        ring = self.ring
        views = op.views
        tail = ring._tail
        if (op.kind > WRITE or op.barrier or len(views) != 1 or not self._single
                or self._blocked or self._barrier_active or self._backlog
                or self._owed >= self._owed_max
                or (tail - ring._khead) & 0xFFFFFFFF >= ring.sq_entries):
            super().submit(op)
            return
        self._inflight += 1
        self._live.add(op)
        v = views[0]
        op.keep = v
        tag = self._next_tag
        self._next_tag = tag + 1 if tag < 0xFFFF_FFFF_FFFF else 1
        self._tags[tag] = op
        self._owed += 1
        if op.kind == READ:
            opcode, sqe_flags = uring.IORING_OP_READ, 0 if op.direct else uring.IOSQE_ASYNC
        else:
            opcode, sqe_flags = uring.IORING_OP_WRITE, 0
        _pack_sqe(ring.sqes, (tail & ring.sq_mask) * SQE_SIZE, opcode, sqe_flags, 0, op.fd,
                  op.offset, uring.buffer_address(v), len(v), 0, tag, 0, 0, 0, 0, 0)
        ring._tail = tail = (tail + 1) & 0xFFFFFFFF
        self._poll_direct = op.direct
        if op.direct and (tail - ring._submitted) & 0xFFFFFFFF >= SUBMIT_EVERY:
            ring.submit()  # the disk starts on these while the rest of the batch is parsed

    def _on_readable(self) -> None:
        self._read_efd()
        if not reap_lone(self):  # one completion: answered first (lone.py)
            self._serve()

    def _collect(self) -> int:
        n = self._reap()
        ring = self.ring
        if self._owed and ring.cq_overflowed():
            self.overflow_flushes += 1
            ring.flush_overflow()
            n += self._reap()
        return n

    def _reap(self) -> int:
        """Reap the ring in one loop: a read or write that transferred all of its bytes at once
        is finished here; anything else (errors, short transfers, bounces, cancels) goes through
        the general `_result`, with the helper threads' results."""
        ring = self.ring
        cq = ring.cq
        head: int = U32.unpack_from(cq, ring._cq_head_off)[0]
        tail: int = U32.unpack_from(cq, ring._cq_tail_off)[0]
        barrier.rmb()  # the CQEs are read after the tail that published them
        n = (tail - head) & 0xFFFFFFFF
        if n:
            mask, base, unpack = ring.cq_mask, ring._cqes_off, uring.CQE.unpack_from
            tags, live, done, raw = self._tags, self._live, self._done, self._raw
            finished = 0
            for i in range(n):
                tag, res, _flags = unpack(cq, base + ((head + i) & mask) * CQE_SIZE)
                op = tags.pop(tag, None)
                if op is None:
                    continue  # a cancel's own completion
                if (res > 0 and res == op.length and op.kind <= WRITE and not op.done
                        and op.bounce is None and not op.cancelled and not op.barrier):
                    op.result = res
                    op.keep = None
                    op.views = []  # no reference to the caller's memory outlives the op
                    live.discard(op)
                    done.append(op)
                    finished += 1
                else:
                    raw.append((op, res))
            # The CQEs are read before the head store that frees their slots: a load before a
            # store, which x86's TSO keeps in order and arm64's acquire fence (rmb) orders.
            barrier.rmb()
            U32.pack_into(cq, ring._cq_head_off, tail)
            self._owed -= n
            self._reaped += n
            if finished:
                self._inflight -= finished
                if self._blocked:
                    self._unblock()
            return finished + super()._collect()
        return super()._collect()

    def _tag(self, op: Op) -> int:
        tag = self._next_tag
        self._next_tag = tag + 1 if tag < 0xFFFF_FFFF_FFFF else 1  # 0 is the cancels' tag
        self._tags[tag] = op
        return tag

    def _start(self, op: Op) -> None:
        ring = self.ring
        k = op.kind
        if k > FSYNC and not (k == FALLOCATE and self._fallocate):
            self._to_thread(op)
            return
        if self._owed >= self._owed_max:
            self._backlog.append(op)
            return
        if not ring.space():
            ring.submit()
            if not ring.space():  # the kernel still holds every entry
                self._backlog.append(op)
                return
        self._owed += 1
        self._poll_direct = op.direct
        if k <= WRITE:
            views = op.current_views()
            offset = op.offset + op.done
            if len(views) == 1 and self._single:
                v = views[0]
                op.keep = v
                ring.prep_rw(uring.IORING_OP_READ if k == READ else uring.IORING_OP_WRITE,
                             op.fd, uring.buffer_address(v), len(v), offset, self._tag(op),
                             uring.IOSQE_ASYNC if k == READ and not op.direct else 0)
            else:
                iov = bytearray(16 * len(views))
                for i, v in enumerate(views):
                    uring.IOVEC.pack_into(iov, 16 * i, uring.buffer_address(v), len(v))
                carrier = (ctypes.c_char * len(iov)).from_buffer(iov)
                op.keep = (views, iov, carrier)
                ring.prep_rw(uring.IORING_OP_READV if k == READ else uring.IORING_OP_WRITEV,
                             op.fd, ctypes.addressof(carrier), len(views), offset,
                             self._tag(op))
        elif k == FSYNC:
            ring.prep_fsync(op.fd, self._tag(op), datasync=bool(op.mode))
        else:
            ring.prep_fallocate(op.fd, op.mode, op.offset, op.length, self._tag(op))

    # -- the watchdog ---------------------------------------------------------------------------
    def _arm(self) -> None:
        loop = self._loop
        if loop is not None and self._watchdog is None and not self.closed:
            self._reaped_at_check = self._reaped
            self._watchdog = loop.call_later(WATCHDOG_S, self._watch)

    def _watch(self) -> None:
        self._watchdog = None
        if self.closed or self._loop is None or not self._owed:
            return
        ring = self.ring
        if self._reaped == self._reaped_at_check and (ring.cq_ready() or ring.cq_overflowed()):
            # A whole period with completions owed, none reaped, and some there: the wake-up
            # never came (an overflow signals nothing).
            self.missed_wakeups += 1
            self._on_readable()
        self._arm()

    def detach(self) -> None:
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        self._poll_from = 0
        if not self.closed and self._signals_on():
            os.eventfd_write(self.efd, 1)  # not lost: the next loop attached sees it
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        super().detach()

    def _flush(self) -> None:
        ring = self.ring
        if self._owed and self._watchdog is None:
            self._arm()
        if ring._tail == ring._khead and not self._backlog:
            return  # nothing queued, and the kernel took everything it was shown
        poll = self.poll
        if (self._loop is not None and poll.max_ns and 0 < self._owed <= POLL_DEPTH
                and self._poll_direct):
            if poll.window and self._poll_handle is None and ring.eventfd_switch:
                # A poll will look at the ring: the completion need not signal the eventfd
                # (that signal costs a read of it, a system call, per request).
                ring.eventfd_signals(False)
                self._quiet = True
            ring.submit()
            if not self._poll_from:
                self._poll_from = time.perf_counter_ns()
            if poll.window and self._poll_handle is None:
                # After whatever else this loop turn runs, before the loop's epoll.
                self._poll_handle = self._loop.call_soon(self._poll_ring)
        else:
            self._poll_from = 0  # a deep queue: its wait says nothing about polling
            ring.submit()
        while (self._backlog and self.ring.space()
               and self._owed < self._owed_max):
            backlog, self._backlog = self._backlog, []
            for op in backlog:
                self._start(op)
            self.ring.submit()

    # -- polling (blockio/poll.py) ----------------------------------------------------------------
    def _poll_ring(self) -> None:
        """Look at the completion ring until the poll window (counted from the submission)
        ends: a completion found is reaped at once, without the epoll sleep and wake-up."""
        self._poll_handle = None
        if self.closed:
            return
        start = self._poll_from
        if not start or not self._owed:
            if self._signals_on():
                self._serve()
            return
        ring = self.ring
        cq, tail_off, unpack, clock = ring.cq, ring._cq_tail_off, U32.unpack_from, \
            time.perf_counter_ns
        head = unpack(cq, ring._cq_head_off)[0]
        now = t0 = clock()
        deadline = start + self.poll.window  # bounded: at most POLL_MAX_NS from the submission
        while now < deadline:
            if unpack(cq, tail_off)[0] != head:
                now = clock()
                self.poll.polled(now - t0, True)
                if self._quiet:  # the eventfd was not signalled: nothing to read from it
                    self._quiet = False
                    ring.eventfd_signals(True)
                    self._poll_hit(now - start)
                else:
                    self._on_readable()
                return
            now = clock()
        self.poll.polled(now - t0, False)
        if self._signals_on():  # came just as the poll ended, while the eventfd was quiet
            self._serve()

    def _poll_hit(self, waited_ns: int) -> None:
        """What a poll found, the short way: reaped and handed to the handler at once (the
        general path, `_serve`, for anything unusual: an overflow, or more work after it)."""
        self.poll.waited(waited_ns)
        self._poll_from = 0
        if reap_lone(self):  # one completion: answered first, as at a wake-up (lone.py)
            return
        self._reap()
        if self._owed and self.ring.cq_overflowed():
            self._serve()
            return
        if self._done and not self._holding:
            self._deliver()
        if self._done or self._raw or self._results:
            self._serve()

    def _signals_on(self) -> bool:
        """The eventfd's signals back on (if a poll turned them off); True when completions
        came meanwhile, which signalled nothing: the caller reaps them."""
        if not self._quiet:
            return False
        self._quiet = False
        self.ring.eventfd_signals(True)
        return bool(self.ring.cq_ready() or self.ring.cq_overflowed())

    def _serve(self) -> None:
        if self._poll_from:  # how long the completion took: the poll window adapts to it
            self.poll.waited(time.perf_counter_ns() - self._poll_from)
            self._poll_from = 0
        super()._serve()

    def _wait(self) -> None:
        if not self._owed:  # only helper-thread work is out: its eventfd write wakes us
            super()._wait()
            return
        # Blocking in io_uring_enter also brings in any CQE the kernel had to keep aside
        # (an overflow, if more than the CQ's size were ever owed).
        self._flush()
        self.ring.submit(wait=1)
        self._read_efd()

    def _cancel_started(self, ops: list[Op]) -> None:
        started = {id(op) for op in ops}
        keep = []
        for op in self._backlog:
            if id(op) in started:  # never reached the kernel
                self._raw.append((op, -errno.ECANCELED))
            else:
                keep.append(op)
        self._backlog = keep
        for tag, op in list(self._tags.items()):
            if id(op) in started:
                if not self.ring.space():
                    self.ring.submit()
                self.ring.prep_cancel(tag, 0)
                self._owed += 1  # a cancel has a completion of its own
        self.ring.submit()

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self.ring.close()
