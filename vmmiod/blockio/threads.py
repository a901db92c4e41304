"""The engines without io_uring: a thread pool, and the inline `sync` engine.

`ThreadEngine` is the fallback where io_uring is missing or refused (an old kernel,
`kernel.io_uring_disabled`, a seccomp filter): a small pool of threads doing preadv/pwritev, so
many requests are in flight at once; each result comes back to the loop through the engine's
eventfd (a buffered read the page cache answers in full is done inline: vmmiod/blockio/inline.py).
`SyncEngine` is the behaviour vmmiod had before the engines: reads and writes run inline on the
event loop at submission (about 1 us from the page cache, but a cold read or a slow disk stalls
everything else), and only fdatasync, fallocate and calls go to one thread, in submission order.
"""

from __future__ import annotations

from vmmiod.blockio.engine import Engine, Handler
from vmmiod.blockio.inline import read_inline
from vmmiod.blockio.op import WRITE, Op, run_blocking

DEFAULT_THREADS = 16


class ThreadEngine(Engine):
    name = "threads"

    def __init__(self, handler: Handler, threads: int = DEFAULT_THREADS) -> None:
        super().__init__(handler, threads=max(1, threads))

    def submit(self, op: Op) -> None:
        """A buffered read the page cache answers in full is done inline (blockio/inline.py):
        no queue, no GIL hand-off to a worker, no eventfd wake-up."""
        if not read_inline(self, op):
            super().submit(op)


class SyncEngine(Engine):
    name = "sync"
    nowait = False  # reads run inline anyway; a RWF_NOWAIT attempt first would only add a miss

    def __init__(self, handler: Handler) -> None:
        super().__init__(handler, threads=1)

    def _start(self, op: Op) -> None:
        if op.kind > WRITE:
            self._to_thread(op)
            return
        # Inline, to the end: short transfers and the bounce retry are processed at once; the
        # completion is delivered at the next kick() (or loop turn), never from inside submit.
        self._raw.append((op, run_blocking(op)))

    def _flush(self) -> None:
        while self._raw:
            self._collect()
