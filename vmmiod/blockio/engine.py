"""The block I/O engine interface: operations in, batches of completions out, on the loop.

An `Op` is one operation on a file: read into / write from a list of buffers (each operation
completes in full or fails), fdatasync, fallocate, or a blocking call run on a worker thread.
The user calls `submit()` for every operation of a batch, then `kick()` once; completions come
back as lists of Ops (`op.result`: bytes transferred or 0, or -errno) through the handler given
at construction, on the event loop thread, woken by an eventfd the loop watches (or from
`kick()` itself for ops finished at submission: the sync engine's, reads done inline).

What every engine does the same way lives here:
- Ordering: an op with `barrier` starts only when every op submitted before it has finished,
  and ops submitted after it wait until it has (the semantics of IOSQE_IO_DRAIN, kept by the
  engine itself so that every engine orders alike).
- Short transfers are continued from where they stopped; end of file is EIO.
- EFAULT (memory the kernel cannot pin: Xen foreign mappings are VM_IO|VM_PFNMAP) and, on an
  O_DIRECT file, EINVAL (misaligned memory) redo the transfer through a page-aligned bounce
  buffer of the op's own.
- `cancel()` returns only when no matching read or write can touch its buffers any more, and
  no matching op is ever delivered: the caller may then drop the memory.
Nothing here knows devices or virtio.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import queue
import select
import threading
from collections import deque
from collections.abc import Callable

from vmmiod.blockio.op import READ, WRITE, Op, run_blocking
from vmmiod.blockio.poll import AdaptivePoll

Handler = Callable[[list[Op]], None]


class Engine:
    """The shared part: ordering, completion processing, the eventfd, helper threads."""

    name = "engine"
    overflow_flushes = 0  # io_uring: completions found on the kernel's CQ overflow list
    missed_wakeups = 0  # io_uring: completions found by the watchdog, without a wake-up
    nowait = True  # buffered reads are tried inline first (io_uring, threads: blockio/inline.py)
    inline_reads = inline_backoff = inline_skip = 0  # reads done inline, back-off (inline.py)
    poll: AdaptivePoll | None = None  # io_uring: the completion poll (blockio/poll.py)
    # io_uring: the owner's answer to a completion that comes alone (blockio/lone.py)
    lone: Callable[[Op], bool] | None = None

    def __init__(self, handler: Handler, threads: int = 1) -> None:
        self._handler = handler
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight = 0  # ops started and not finished
        self._live: set[Op] = set()
        self._blocked: deque[Op] = deque()  # waiting behind a barrier
        self._barrier_active = False
        self._done: list[Op] = []  # finished, not yet delivered
        self._raw: list[tuple[Op, int]] = []
        self._results: deque[tuple[Op, int]] = deque()  # from the helper threads
        self._nthreads = threads
        self._jobs: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._kicking = False
        self._holding = False  # inside cancel(): completions wait for the next turn
        self.closed = False

    # -- the loop -------------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Deliver completions on `loop` (None: `kick()` waits for them: sans-IO use)."""
        if loop is self._loop:
            return
        self.detach()
        if loop is not None:
            loop.add_reader(self.efd, self._on_readable)
        self._loop = loop

    def detach(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.efd)
            except (RuntimeError, ValueError, OSError):  # the loop is already closed
                pass
            self._loop = None

    def _on_readable(self) -> None:
        self._read_efd()
        self._serve()

    def _serve(self) -> None:
        """Collect what completed, deliver it, and hand on what the handler submits."""
        self._collect()
        self._flush()
        while self._done and not self._holding:
            self._deliver()
            self._flush()  # what the handler submitted (the sync engine may finish it here)

    def _read_efd(self) -> None:
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass

    # -- submission -----------------------------------------------------------------------------
    def submit(self, op: Op) -> None:
        if self._barrier_active or self._blocked or (op.barrier and self._inflight):
            self._blocked.append(op)
            return
        self._launch(op)

    def _launch(self, op: Op) -> None:
        self._inflight += 1
        self._live.add(op)
        if op.barrier:
            self._barrier_active = True
        self._start(op)

    def kick(self) -> None:
        """Hand every submitted op to the kernel (one system call where the engine can). With
        no loop attached, wait here until everything submitted has completed and been
        delivered."""
        self._flush()
        if self._loop is not None or self._kicking:
            if self._done:  # finished at once (the sync engine's inline work)
                self._deliver()
            return
        self._kicking = True
        try:  # everything in flight first, then one delivery: a batch completes as a batch
            while self._inflight or self._done:
                while self._inflight:
                    if not self._collect():
                        self._wait()
                self._deliver()
                self._flush()
        finally:
            self._kicking = False

    def flush(self) -> None:
        """Hand what is queued to the kernel now, delivering nothing (the caller still kicks
        once its batch is complete): a lone request need not wait for the batch's bookkeeping."""
        self._flush()

    @property
    def in_flight(self) -> int:
        return self._inflight

    # -- completion -----------------------------------------------------------------------------
    def _collect(self) -> int:
        """Process every raw result available now (ring and helper threads); returns how many."""
        raw = self._raw
        results = self._results
        while results:
            raw.append(results.popleft())
        n = len(raw)
        if n:
            self._raw = []
            for op, res in raw:
                self._result(op, res)
        return n

    def _result(self, op: Op, res: int) -> None:
        if op.cancelled:
            self._finish(op, -errno.ECANCELED)
            return
        if op.kind <= WRITE:
            if res > 0 and res + op.done == op.length and op.bounce is None:
                self._finish(op, op.length)  # the common case: all of it at once
                return
            if res < 0:
                if res in (-errno.EINTR, -errno.EAGAIN):
                    self._start(op)
                    return
                if op.bounce is None and (res == -errno.EFAULT
                                          or (res == -errno.EINVAL and op.direct)):
                    self._to_bounce(op)
                    self._start(op)
                    return
                self._finish(op, res)
                return
            op.done += res
            if op.done < op.length:
                if res == 0:
                    self._finish(op, -errno.EIO)  # end of file inside the range
                else:
                    self._start(op)  # a short transfer: go on from where it stopped
                return
            if op.bounce is not None and op.kind == READ:
                src = memoryview(op.bounce)
                pos = 0
                for v in op.views:
                    n = len(v)
                    v[:] = src[pos:pos + n]
                    pos += n
                src.release()
            self._finish(op, op.length)
            return
        self._finish(op, res)

    def _to_bounce(self, op: Op) -> None:
        op.done = 0
        op.bounce = mmap.mmap(-1, max(op.length, 1))  # page-aligned
        if op.kind == WRITE:
            dst = memoryview(op.bounce)
            pos = 0
            for v in op.views:
                n = len(v)
                dst[pos:pos + n] = v
                pos += n
            dst.release()

    def _finish(self, op: Op, res: int) -> None:
        op.result = res
        op.keep = None
        op.views = []  # no reference to the caller's memory outlives the op
        if op.bounce is not None:
            try:
                op.bounce.close()
            except BufferError:  # a view of it is still held somewhere: the GC unmaps it
                pass
            op.bounce = None
        self._live.discard(op)
        self._inflight -= 1
        if op.barrier:
            self._barrier_active = False
        if not op.cancelled:
            self._done.append(op)
        if self._blocked:
            self._unblock()

    def _unblock(self) -> None:
        """Start the ops waiting behind a barrier that may start now, in order."""
        blocked = self._blocked
        while blocked and not self._barrier_active:
            nxt = blocked[0]
            if nxt.barrier and self._inflight:
                break
            blocked.popleft()
            self._launch(nxt)

    def _deliver(self) -> None:
        if self._holding or not self._done:
            return
        done, self._done = self._done, []
        self._handler(done)

    # -- cancel ---------------------------------------------------------------------------------
    def cancel(self, match: Callable[[Op], bool]) -> int:
        """Drop every op `match` selects: not started ones at once; started ones are cancelled
        where the engine can, and this returns only when no matching read or write is running.
        None of them is delivered. Returns how many were dropped."""
        kept = deque(op for op in self._blocked if not match(op))
        dropped = len(self._blocked) - len(kept)
        self._blocked = kept
        victims = [op for op in self._live if match(op)]
        for op in victims:
            op.cancelled = True
        self._done = [op for op in self._done if not match(op)]
        self._cancel_started(victims)
        self._holding = True
        try:
            while any(op in self._live for op in victims if op.kind <= WRITE):
                if not self._collect():
                    self._wait()
        finally:
            self._holding = False
        if self._done and self._loop is not None:
            self._loop.call_soon(self._on_readable)  # what finished meanwhile, on a clean turn
        return dropped + len(victims)

    def _wait(self) -> None:
        """Block until the eventfd says a completion is there (the ring signals it too)."""
        self._flush()
        select.select([self.efd], [], [])
        self._read_efd()

    # -- helper threads -------------------------------------------------------------------------
    def _to_thread(self, op: Op) -> None:
        if len(self._threads) < self._nthreads:
            t = threading.Thread(target=self._worker, name=f"blkio-{self.name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._jobs.put(op)

    def _worker(self) -> None:
        jobs, results, efd = self._jobs, self._results, self.efd
        while True:
            op = jobs.get()
            if op is None:
                return
            res = -errno.ECANCELED if op.cancelled else run_blocking(op)
            results.append((op, res))
            os.eventfd_write(efd, 1)

    # -- what an engine provides ----------------------------------------------------------------
    def _start(self, op: Op) -> None:
        """Begin (or continue) `op`; its result arrives through `_collect` (ring, threads)."""
        self._to_thread(op)

    def _flush(self) -> None:
        """Hand queued work to the kernel."""

    def _cancel_started(self, ops: list[Op]) -> None:
        """Ask the kernel to stop these where it can (threads: a queued op is skipped)."""

    def close(self) -> None:
        """Wait for everything in flight (nothing is delivered any more), stop the threads."""
        if self.closed:
            return
        self.cancel(lambda op: True)
        while self._inflight:
            if not self._collect():
                self._wait()
        self.detach()
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        os.close(self.efd)
        self.closed = True
