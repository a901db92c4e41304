"""io_uring through the kernel's system calls: ctypes for the calls, mmap for the rings.

No library: `io_uring_setup` (425), `io_uring_enter` (426) and `io_uring_register` (427) have the
same numbers on x86_64 and arm64 (the unified syscall table, include/uapi/asm-generic). The
submission ring, the completion ring and the SQE array are mmap'ed at the offsets the kernel
fixes (IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES). The layouts below follow
include/uapi/linux/io_uring.h; nothing here knows devices or files beyond an fd.

A `Ring` is used from one thread (the event loop's). Entries are queued with `prep_*` (no system
call) and handed to the kernel by one `submit()`. The completion ring is read by its user in one
loop over `cq` (UringEngine._collect: head and tail at `_cq_head_off`/`_cq_tail_off`, the CQEs
from `_cqes_off`, read barrier after the tail and again before the head is stored: the
CQEs' loads before that store; blockio/lone.py for a wake-up with one completion).

A completion the kernel could not put in the completion ring waits on its overflow list
(IORING_FEAT_NODROP), IORING_SQ_CQ_OVERFLOW is set in the SQ flags, and the registered eventfd is
not signalled for it (the kernel signals only when the ring's tail moves). Only an
io_uring_enter with IORING_ENTER_GETEVENTS moves such completions into the ring
(`flush_overflow`). Linux 6.18 was seen to overflow a 512-entry ring that held fewer than 40
completions (O_DIRECT writes finished by io-wq workers); so the user checks `cq_overflowed()`
whenever it reaps, and does not rely on the eventfd alone (UringEngine's watchdog).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct

from vmmiod import barrier

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427

# Opcodes (enum io_uring_op).
IORING_OP_NOP = 0
IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_OP_ASYNC_CANCEL = 14
IORING_OP_FALLOCATE = 17
IORING_OP_READ = 22
IORING_OP_WRITE = 23
OP_NAMES = {IORING_OP_NOP: "nop", IORING_OP_READV: "readv", IORING_OP_WRITEV: "writev",
            IORING_OP_FSYNC: "fsync", IORING_OP_ASYNC_CANCEL: "async_cancel",
            IORING_OP_FALLOCATE: "fallocate", IORING_OP_READ: "read", IORING_OP_WRITE: "write"}

IOSQE_IO_DRAIN = 1 << 1
IOSQE_ASYNC = 1 << 4  # Linux 5.6: start the op in an io-wq worker, not in io_uring_enter
IORING_FSYNC_DATASYNC = 1 << 0
IORING_ENTER_GETEVENTS = 1 << 0
IORING_SQ_CQ_OVERFLOW = 1 << 1  # in the SQ ring's flags: completions wait on the overflow list
IORING_CQ_EVENTFD_DISABLED = 1 << 0  # in the CQ ring's flags (Linux 5.8): no eventfd signals
IORING_FEAT_NODROP = 1 << 1
IORING_REGISTER_EVENTFD = 4
IORING_REGISTER_PROBE = 8
IO_URING_OP_SUPPORTED = 1 << 0
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

# struct io_uring_params: sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features,
# wq_fd, resv[3]; io_sqring_offsets (head, tail, ring_mask, ring_entries, flags, dropped, array,
# resv1, user_addr); io_cqring_offsets (head, tail, ring_mask, ring_entries, overflow, cqes,
# flags, resv1, user_addr). 120 bytes.
PARAMS = struct.Struct("<10I 8IQ 8IQ")
# struct io_uring_sqe (64 bytes): opcode, flags, ioprio, fd, off, addr, len, op flags, user_data,
# buf_index, personality, splice_fd_in, addr3, pad.
SQE = struct.Struct("<BBHiQQIIQHHiQQ")
SQE_SIZE = SQE.size
# struct io_uring_cqe (16 bytes): user_data, res, flags.
CQE = struct.Struct("<QiI")
CQE_SIZE = CQE.size
U32 = struct.Struct("<I")
IOVEC = struct.Struct("<QQ")
# struct io_uring_probe: last_op, ops_len, resv, resv2[3]; then io_uring_probe_op[]: op, resv,
# flags, resv2.
PROBE_HEAD = struct.Struct("<BBH3I")
PROBE_OP = struct.Struct("<BBHI")
PROBE_OPS = 256

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class UringUnavailable(OSError):
    """io_uring is missing (ENOSYS), refused (EPERM: kernel.io_uring_disabled, seccomp) or
    lacks an operation the caller needs."""


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def buffer_address(view: memoryview) -> int:
    """The address of a buffer's first byte. The caller keeps `view` alive while the kernel
    may use the address (until the entry's completion is reaped)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except TypeError:  # a read-only buffer: the C buffer protocol gives its address too
        return _readonly_address(view)


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def _readonly_address(view: memoryview) -> int:
    pb = _PyBuffer()
    _get_buffer(view, ctypes.byref(pb), 0)
    try:
        return int(pb.buf or 0)
    finally:
        _release_buffer(ctypes.byref(pb))


class Ring:
    """One io_uring instance: its fd, the three mappings, and local SQ/CQ cursors."""

    def __init__(self, entries: int) -> None:
        params = bytearray(PARAMS.size)
        ret = _syscall(SYS_IO_URING_SETUP, ctypes.c_uint(entries),
                       (ctypes.c_char * len(params)).from_buffer(params))
        if ret < 0:
            e = ctypes.get_errno()
            raise UringUnavailable(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = int(ret)
        try:
            self._map(PARAMS.unpack(params))
        except BaseException:
            os.close(self.fd)
            raise

    def _map(self, p: tuple[int, ...]) -> None:
        self.sq_entries: int = int(p[0])
        self.cq_entries: int = int(p[1])
        self.features: int = int(p[5])
        sq_head, sq_tail, sq_mask, _sq_n, sq_flags, sq_dropped, sq_array = p[10:17]
        cq_head, cq_tail, cq_mask, _cq_n, cq_overflow, cq_cqes, cq_flags = p[19:26]
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_POPULATE
        self._sq_map = mmap.mmap(self.fd, sq_array + 4 * self.sq_entries, flags, prot,
                                 offset=IORING_OFF_SQ_RING)
        self._cq_map = mmap.mmap(self.fd, cq_cqes + CQE_SIZE * self.cq_entries, flags, prot,
                                 offset=IORING_OFF_CQ_RING)
        self._sqe_map = mmap.mmap(self.fd, SQE_SIZE * self.sq_entries, flags, prot,
                                  offset=IORING_OFF_SQES)
        self.sq = memoryview(self._sq_map)
        self.cq = memoryview(self._cq_map)
        self.sqes = memoryview(self._sqe_map)
        self._sq_head_off, self._sq_tail_off = sq_head, sq_tail
        self._sq_dropped_off = sq_dropped
        self._sq_flags_off = sq_flags
        self.sq_mask = U32.unpack_from(self.sq, sq_mask)[0]
        self._cq_head_off, self._cq_tail_off = cq_head, cq_tail
        self._cq_overflow_off = cq_overflow
        self.cq_mask = U32.unpack_from(self.cq, cq_mask)[0]
        self._cqes_off = cq_cqes
        # The CQ ring's flags word (Linux 5.8; offset 0 before: no such word, no switch).
        self._cq_flags_off = cq_flags
        self.eventfd_switch = cq_flags != 0
        # Slot i of the SQ index array always names SQE i: entries are written in ring order.
        for i in range(self.sq_entries):
            U32.pack_into(self.sq, sq_array + 4 * i, i)
        self._tail: int = U32.unpack_from(self.sq, sq_tail)[0]  # our next free SQE (not shown)
        self._submitted: int = self._tail  # tail the kernel has been told about
        # The kernel's SQ head as last read: never ahead of the real one, so a free-slot count
        # from it is never too high (the engine's fast path trusts it, space() re-reads).
        self._khead: int = self._tail
        self.closed = False

    # -- registration ---------------------------------------------------------------------------
    def probe(self) -> set[int]:
        """The opcodes this kernel's io_uring supports (IORING_REGISTER_PROBE, Linux 5.6)."""
        buf = bytearray(PROBE_HEAD.size + PROBE_OP.size * PROBE_OPS)
        c = (ctypes.c_char * len(buf)).from_buffer(buf)
        if _syscall(SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_PROBE, c, PROBE_OPS) < 0:
            e = ctypes.get_errno()
            if e == errno.EINVAL:  # before 5.6: no probe; READV/WRITEV/FSYNC exist since 5.1
                return {IORING_OP_NOP, IORING_OP_READV, IORING_OP_WRITEV, IORING_OP_FSYNC}
            raise OSError(e, f"IORING_REGISTER_PROBE: {os.strerror(e)}")
        del c
        ops_len = PROBE_HEAD.unpack_from(buf, 0)[1]
        ops = set()
        for i in range(min(ops_len, PROBE_OPS)):
            op, _r, flags, _r2 = PROBE_OP.unpack_from(buf, PROBE_HEAD.size + PROBE_OP.size * i)
            if flags & IO_URING_OP_SUPPORTED:
                ops.add(op)
        return ops

    def register_eventfd(self, efd: int) -> None:
        """Every completion posted from now on also signals `efd`."""
        arg = ctypes.c_int32(efd)
        _check(_syscall(SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_EVENTFD,
                        ctypes.byref(arg), 1))

    # -- submission -----------------------------------------------------------------------------
    def space(self) -> int:
        """Free SQEs (the kernel consumes entries at submit, so this is what we have queued)."""
        head: int = U32.unpack_from(self.sq, self._sq_head_off)[0]
        self._khead = head
        return self.sq_entries - ((self._tail - head) & 0xFFFFFFFF)

    def _prep(self, opcode: int, flags: int, fd: int, off: int, addr: int, length: int,
              op_flags: int, user_data: int) -> None:
        i = self._tail & self.sq_mask
        SQE.pack_into(self.sqes, i * SQE_SIZE, opcode, flags, 0, fd, off, addr, length,
                      op_flags, user_data, 0, 0, 0, 0, 0)
        self._tail = (self._tail + 1) & 0xFFFFFFFF

    def prep_rw(self, opcode: int, fd: int, addr: int, length: int, offset: int,
                user_data: int, flags: int = 0) -> None:
        """READ/WRITE (addr = buffer, length = bytes) or READV/WRITEV (addr = iovec array,
        length = iovec count)."""
        self._prep(opcode, flags, fd, offset, addr, length, 0, user_data)

    def prep_fsync(self, fd: int, user_data: int, datasync: bool = True, flags: int = 0) -> None:
        self._prep(IORING_OP_FSYNC, flags, fd, 0, 0, 0,
                   IORING_FSYNC_DATASYNC if datasync else 0, user_data)

    def prep_fallocate(self, fd: int, mode: int, offset: int, length: int, user_data: int,
                       flags: int = 0) -> None:
        # io_fallocate_prep: off = offset, addr = length, len = mode.
        self._prep(IORING_OP_FALLOCATE, flags, fd, offset, length, mode, 0, user_data)

    def prep_cancel(self, target: int, user_data: int) -> None:
        self._prep(IORING_OP_ASYNC_CANCEL, 0, -1, 0, target, 0, 0, user_data)

    def prep_nop(self, user_data: int) -> None:
        self._prep(IORING_OP_NOP, 0, -1, 0, 0, 0, 0, user_data)

    # -- completion -----------------------------------------------------------------------------
    def cq_ready(self) -> int:
        """Completions in the ring, not yet reaped."""
        head: int = U32.unpack_from(self.cq, self._cq_head_off)[0]
        tail: int = U32.unpack_from(self.cq, self._cq_tail_off)[0]
        return (tail - head) & 0xFFFFFFFF

    def eventfd_signals(self, on: bool) -> None:
        """Turn the registered eventfd's signals off (IORING_CQ_EVENTFD_DISABLED) or back on.
        Completions posted while they are off signal nothing: the caller looks at the ring
        itself, and after turning them back on looks once more (`cq_ready`)."""
        U32.pack_into(self.cq, self._cq_flags_off, 0 if on else IORING_CQ_EVENTFD_DISABLED)
        if on:
            barrier.mb()  # the flag is stored before the tail is read again

    def cq_overflowed(self) -> bool:
        """Completions wait on the kernel's overflow list (no eventfd signal announced them)."""
        return bool(U32.unpack_from(self.sq, self._sq_flags_off)[0] & IORING_SQ_CQ_OVERFLOW)

    def flush_overflow(self) -> None:
        """Move overflowed completions into the ring, as far as it has room: one io_uring_enter
        with IORING_ENTER_GETEVENTS and nothing to wait for."""
        while True:
            ret = _syscall(SYS_IO_URING_ENTER, self.fd, 0, 0, IORING_ENTER_GETEVENTS, None, 0)
            if ret >= 0:
                return
            e = ctypes.get_errno()
            if e == errno.EINTR:
                continue
            if e in (errno.EAGAIN, errno.EBUSY):  # the ring is full: the caller reaps first
                return
            raise OSError(e, f"io_uring_enter: {os.strerror(e)}")

    # -- submission, continued --------------------------------------------------------------------
    def pending(self) -> int:
        return (self._tail - self._submitted) & 0xFFFFFFFF

    def submit(self, wait: int = 0) -> int:
        """Show the queued entries to the kernel and submit them in one io_uring_enter; with
        `wait`, also block until that many completions are posted."""
        if self._tail != self._submitted:
            barrier.wmb()  # the SQEs are written before the tail that publishes them
            U32.pack_into(self.sq, self._sq_tail_off, self._tail)
            self._submitted = self._tail
        # Everything the kernel has not consumed yet, including entries an earlier call left
        # (EAGAIN/EBUSY): the kernel takes them from its SQ head on.
        head: int = U32.unpack_from(self.sq, self._sq_head_off)[0]
        self._khead = head
        n = (self._tail - head) & 0xFFFFFFFF
        if not n and not wait:
            return 0
        flags = IORING_ENTER_GETEVENTS if wait else 0
        while True:
            ret = _syscall(SYS_IO_URING_ENTER, self.fd, n, wait, flags, None, 0)
            if ret >= 0:
                self._khead = (head + ret) & 0xFFFFFFFF  # consumed in the call (no SQPOLL)
                return int(ret)
            e = ctypes.get_errno()
            if e == errno.EINTR:
                continue
            if e in (errno.EAGAIN, errno.EBUSY):  # CQ full: the caller reaps, then retries
                return 0
            raise OSError(e, f"io_uring_enter: {os.strerror(e)}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for v in (self.sq, self.cq, self.sqes):
            v.release()
        for m in (self._sq_map, self._cq_map, self._sqe_map):
            m.close()
        os.close(self.fd)
