"""The backing of a virtio-blk device: a raw image file or a host block device.

Opening finds the size (file size, or BLKGETSIZE64), the block geometry of a block device
(logical/physical sector, io min/opt, alignment), takes an OFD lock on the whole image and
decides how I/O is done:

- `writeback` / `writethrough`: one buffered fd; FLUSH (and, in writethrough, every write
  batch) ends with fdatasync.
- `none`: O_DIRECT where the filesystem allows it (`fd`). A request whose offset and length
  are aligned goes straight from/to guest memory; if the kernel refuses the guest's buffers
  (EINVAL: misaligned memory) the I/O engine redoes it through an aligned bounce buffer; a
  request whose offset or length is not aligned to the direct-I/O block uses the second,
  buffered fd (Linux keeps the page cache coherent with direct I/O on the same file; fdatasync
  works on the file, through either fd).

Reads, writes and fdatasync go through the I/O engine (vmmiod/blockio/, driven by
devices/block_io.py); discard and write zeroes are here because the engine's fallback for them
is a blocking call. Every method raises OSError; the device turns that into IOERR. Nothing here
knows virtio.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
from pathlib import Path
from typing import Literal

from vmmiod.blockio import fallocate

# Linux ioctls on block devices (include/uapi/linux/fs.h).
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)
BLKSSZGET = 0x1268  # logical sector size (int)
BLKIOMIN = 0x1278
BLKIOOPT = 0x1279
BLKALIGNOFF = 0x127A
BLKPBSZGET = 0x127B  # physical sector size

# fallocate(2) modes.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

IOV_MAX = 1024  # Linux UIO_MAXIOV: preadv/pwritev refuse more buffers per call
ZERO_CHUNK = 1 << 20  # write-zeroes fallback writes at most this much per call
# struct flock on Linux 64-bit: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padding (32 bytes).
FLOCK = struct.Struct("hhqqi4x")


class ImageLocked(Exception):
    """Another open file description holds a conflicting lock on the image."""


class Topology:
    """Block geometry in bytes; from the device's ioctls, or defaults for a file."""

    __slots__ = ("align_offset", "io_min", "io_opt", "logical", "physical")

    def __init__(self, logical: int = 512, physical: int = 512, io_min: int = 0,
                 io_opt: int = 0, align_offset: int = 0) -> None:
        self.logical = logical
        self.physical = physical
        self.io_min = io_min
        self.io_opt = io_opt
        self.align_offset = align_offset


def _ioctl_int(fd: int, request: int, fmt: str) -> int:
    s = struct.Struct(fmt)
    value: int = s.unpack(fcntl.ioctl(fd, request, bytes(s.size)))[0]
    return value


class Backing:
    """An open image: size, topology, the lock, and I/O entry points."""

    def __init__(self, path: Path, *, readonly: bool,
                 cache: Literal["writeback", "writethrough", "none"], lock: bool) -> None:
        self.path = path
        self.readonly = readonly
        self.cache = cache
        self.lock = lock
        self.fd = -1  # the fd for aligned I/O (O_DIRECT when direct is True)
        self.buffered_fd = -1  # buffered fd: everything, or unaligned I/O with direct
        self.direct = False
        self.direct_align = 1
        self.direct_unavailable = False  # cache: none asked, but the filesystem refused O_DIRECT
        self.size = 0
        self.is_block_device = False
        self.topology = Topology()
        self.discard_granularity = 4096

    # -- open / close ---------------------------------------------------------------------------
    def open(self) -> None:
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(self.path, flags)
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                self.is_block_device = True
                self.size = _ioctl_int(fd, BLKGETSIZE64, "Q")
                self.topology = Topology(
                    logical=_ioctl_int(fd, BLKSSZGET, "i"),
                    physical=_ioctl_int(fd, BLKPBSZGET, "I"),
                    io_min=_ioctl_int(fd, BLKIOMIN, "I"),
                    io_opt=_ioctl_int(fd, BLKIOOPT, "I"),
                    align_offset=max(0, _ioctl_int(fd, BLKALIGNOFF, "i")))
                self.discard_granularity = max(self.topology.physical, self.topology.logical)
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
                # Holes are punched at filesystem-block granularity; smaller parts are zeroed.
                self.discard_granularity = max(512, st.st_blksize)
            else:
                raise OSError(errno.EINVAL, "not a regular file or block device")
            if self.lock:
                self._take_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        self.buffered_fd = self.fd = fd
        if self.cache == "none":
            self._open_direct(flags)

    def _take_lock(self, fd: int) -> None:
        """Whole-image OFD lock: write lock for read-write, read lock for read-only.

        OFD locks belong to the open file description, so a second open in this very process
        conflicts too, and they conflict with QEMU's byte-range image locks.
        """
        ltype = fcntl.F_RDLCK if self.readonly else fcntl.F_WRLCK
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(ltype, os.SEEK_SET, 0, 0, 0))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ImageLocked(str(self.path)) from exc
            raise

    def _open_direct(self, flags: int) -> None:
        try:
            dfd = os.open(self.path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct_unavailable = True  # filesystem without O_DIRECT: stay buffered
            return
        align = self.topology.logical if self.is_block_device else self._probe_align(dfd)
        if align == 0:
            os.close(dfd)
            self.direct_unavailable = True
            return
        self.fd, self.direct, self.direct_align = dfd, True, align

    def _probe_align(self, dfd: int) -> int:
        """The smallest offset/length alignment O_DIRECT accepts on this file (0: none)."""
        if self.size == 0:
            return 4096
        buf = mmap.mmap(-1, 4096)
        try:
            for align in (512, 4096):
                if align > self.size:
                    break
                try:
                    os.preadv(dfd, [memoryview(buf)[:align]], 0)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            return 0
        finally:
            buf.close()

    def close(self) -> None:
        """Flush and close. Raises the flush's OSError after closing everything."""
        err: OSError | None = None
        if self.fd >= 0 and not self.readonly:
            try:
                os.fdatasync(self.buffered_fd)
            except OSError as exc:
                err = exc
        for fd in {self.fd, self.buffered_fd}:
            if fd >= 0:
                os.close(fd)
        self.fd = self.buffered_fd = -1
        if err is not None:
            raise err

    # -- discard / write zeroes -----------------------------------------------------------------
    def discard(self, offset: int, length: int) -> bool:
        """Punch a hole (reads back as zeros). False: the filesystem cannot; the hint is dropped."""
        try:
            fallocate(self.buffered_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                      length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
                return False
            raise
        return True

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero a range: a punched hole when unmap is allowed, else zeroed allocated blocks."""
        if unmap and self.discard(offset, length):
            return
        try:
            fallocate(self.buffered_fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset,
                      length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
                raise
        # tmpfs and others: punch then re-allocate gives allocated zeros; else write them.
        if not self.is_block_device and self.discard(offset, length):
            try:
                fallocate(self.buffered_fd, FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
            return
        zero = bytes(min(length, ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zero), end - offset)
            offset += os.pwrite(self.buffered_fd, memoryview(zero)[:n], offset)

