"""One block I/O operation (`Op`) and how a worker thread runs one (`run_blocking`).

The kinds, the fields every engine reads and writes, and fallocate(2) with a mode (the standard
library has none). Neutral: nothing here knows engines, devices or virtio.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable
from typing import Any

READ, WRITE, FSYNC, FALLOCATE, CALL = range(5)
KIND_NAMES = ("read", "write", "fsync", "fallocate", "call")
IOV_MAX = 1024  # Linux UIO_MAXIOV

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none)."""
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Op:
    """One operation. `owner` is the caller's; the engine never looks at it."""

    __slots__ = ("barrier", "bounce", "cancelled", "direct", "done", "error", "fd", "fn", "keep",
                 "kind", "length", "mode", "offset", "owner", "result", "views")

    def __init__(self, kind: int, fd: int = -1, views: list[memoryview] | None = None,
                 offset: int = 0, length: int = 0, owner: Any = None, barrier: bool = False,
                 direct: bool = False, mode: int = 0,
                 fn: Callable[[], object] | None = None) -> None:
        self.kind = kind
        self.fd = fd
        self.views = views if views is not None else []
        self.offset = offset
        self.length = length
        self.owner = owner
        self.barrier = barrier
        self.direct = direct  # fd is O_DIRECT: EINVAL means misaligned memory, bounce it
        self.mode = mode  # fallocate mode; FSYNC: 1 = datasync
        self.fn = fn
        self.done = 0
        self.result = 0
        self.error: BaseException | None = None  # CALL: an exception that was not an OSError
        self.bounce: mmap.mmap | None = None
        self.cancelled = False
        self.keep: object = None  # what the kernel points into until the completion

    def current_views(self) -> list[memoryview]:
        """The buffers still to transfer (after a short transfer), at most IOV_MAX of them."""
        views = [memoryview(self.bounce)[:self.length]] if self.bounce is not None else self.views
        skip = self.done
        if not skip:
            return views if len(views) <= IOV_MAX else views[:IOV_MAX]
        out: list[memoryview] = []
        for v in views:
            n = len(v)
            if skip >= n:
                skip -= n
                continue
            out.append(v[skip:] if skip else v)
            skip = 0
            if len(out) == IOV_MAX:
                break
        return out


def run_blocking(op: Op) -> int:
    """One system call of `op` (or its whole call), as a worker thread does it: result or -errno."""
    try:
        k = op.kind
        if k == READ:
            return os.preadv(op.fd, op.current_views(), op.offset + op.done)
        if k == WRITE:
            return os.pwritev(op.fd, op.current_views(), op.offset + op.done)
        if k == FSYNC:
            (os.fdatasync if op.mode else os.fsync)(op.fd)
            return 0
        if k == FALLOCATE:
            fallocate(op.fd, op.mode, op.offset, op.length)
            return 0
        assert op.fn is not None
        op.fn()
        return 0
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    except Exception as exc:  # noqa: BLE001  (a bug in a call fails its op, not the engine)
        op.error = exc
        return -errno.EIO
