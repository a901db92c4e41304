"""Block I/O engines: many operations in flight on a file, completions on the event loop.

`open_engine(kind, handler)` returns the engine for a config's `io_engine` value: `io_uring`
(vmmiod/blockio/uring_engine.py), `threads` (a preadv/pwritev pool) or `sync` (reads and writes
inline on the loop, as before the engines existed); `auto` tries io_uring and falls back to
threads where the kernel lacks or refuses it. Neutral: no device or hypervisor imports.
"""

from __future__ import annotations

from vmmiod.blockio.engine import Engine, Handler
from vmmiod.blockio.op import CALL, FALLOCATE, FSYNC, KIND_NAMES, READ, WRITE, Op, fallocate
from vmmiod.blockio.poll import POLL_MAX_NS
from vmmiod.blockio.threads import SyncEngine, ThreadEngine
from vmmiod.blockio.uring import UringUnavailable

ENGINES = ("auto", "io_uring", "threads", "sync")


def open_engine(kind: str, handler: Handler,
                poll_max_ns: int = POLL_MAX_NS) -> tuple[Engine, str | None]:
    """The engine `kind` names, and why auto fell back (None when it did not). `poll_max_ns`
    bounds io_uring's completion poll (blockio/poll.py; 0: none); the others do not poll.

    Raises UringUnavailable (an OSError) when `io_uring` is asked for and cannot be had.
    """
    if kind == "threads":
        return ThreadEngine(handler), None
    if kind == "sync":
        return SyncEngine(handler), None
    from vmmiod.blockio.uring_engine import UringEngine
    try:
        return UringEngine(handler, poll_max_ns=poll_max_ns), None
    except OSError as exc:
        if kind == "io_uring":
            raise UringUnavailable(exc.errno or 0, exc.strerror or str(exc)) from exc
        return ThreadEngine(handler), exc.strerror or str(exc)


__all__ = ["CALL", "ENGINES", "FALLOCATE", "FSYNC", "KIND_NAMES", "READ", "WRITE", "Engine",
           "Handler", "Op", "SyncEngine", "ThreadEngine", "UringUnavailable", "fallocate",
           "open_engine"]
