"""Checks on the file descriptors a VMM hands over, and mapping them (daemon side).

Every check here protects the daemon from its peer. Touching a shared mapping whose page the
file cannot supply kills the daemon with SIGBUS, and Python cannot survive that, so the daemon
maps only what its peer cannot take away (docs/generic-ioreq.md, "Memory fds"):
- a memfd (the only kind of file that can be sealed): a regular file, a tmpfs file or a
  socket is refused, since the VMM could truncate it at any time;
- sealed with F_SEAL_SHRINK, and at least as long as the range mapped;
- not on hugetlbfs: a VMM may punch a hole in a sealed memfd (the seal allows it) and a
  hugetlbfs page faulted back in with the huge page pool exhausted is a SIGBUS. A tmpfs
  memfd refills a hole with a fresh page instead.
Everything is refused before anything is mapped.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import stat

from vmmiod.hypervisors.generic.protocol import (
    IOREQ_PAGE_SIZE,
    REFUSE_BAD_FD,
    REFUSE_PAGE,
    REFUSE_REGIONS,
    ProtocolError,
    RegionSpec,
)
from vmmiod.memory import GuestMemoryError, MappedMemory

EVENTFD_LINK = "anon_inode:[eventfd]"
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK  # every other seal is tolerated (if the mapping works)
HUGETLBFS_MAGIC = 0x958458F6  # statfs f_type of hugetlbfs (linux/magic.h)
_STATFS_BYTES = 256  # struct statfs is 120 bytes on 64-bit Linux; f_type is its first long
_libc: ctypes.CDLL | None = None


def fs_type(fd: int) -> int | None:
    """The f_type of the filesystem `fd` lives on (fstatfs), or None when it cannot be read."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(_STATFS_BYTES)
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFF_FFFF


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == EVENTFD_LINK
    except OSError:
        return False


def check_eventfd(fd: int, what: str) -> None:
    if not is_eventfd(fd):
        raise ProtocolError(REFUSE_BAD_FD, f"{what}: fd is not an eventfd")


def _check_memory_fd(fd: int, need: int, what: str, reason: int) -> int:
    """A sealed (F_SEAL_SHRINK) memfd, not on hugetlbfs, holding at least `need` bytes."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ProtocolError(reason, f"{what}: fstat failed: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(reason, f"{what}: not a memfd")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ProtocolError(reason, f"{what}: not a memfd (a file cannot be sealed, so the "
                                    f"VMM could truncate it under the daemon)") from None
    if fs_type(fd) == HUGETLBFS_MAGIC:
        raise ProtocolError(reason, f"{what}: hugetlbfs memfds are refused (a punched hole "
                                    f"faulted back with the huge page pool empty is SIGBUS)")
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ProtocolError(reason, f"{what}: memfd is not sealed against shrinking "
                                    f"(F_SEAL_SHRINK); create it with MFD_ALLOW_SEALING, "
                                    f"then seal it")
    if st.st_size < need:
        raise ProtocolError(reason, f"{what}: memfd holds {st.st_size} bytes, {need} needed")
    return st.st_size


def map_regions(regions: tuple[RegionSpec, ...], fds: list[int]) -> MappedMemory:
    """Map every region as guest RAM. Raises ProtocolError(REFUSE_REGIONS); nothing stays mapped."""
    memory = MappedMemory()
    try:
        for k, (spec, fd) in enumerate(zip(regions, fds)):
            what = f"region {k} ({spec.gpa:#x}+{spec.size:#x})"
            _check_memory_fd(fd, spec.offset + spec.size, what, REFUSE_REGIONS)
            try:
                memory.map_fd(spec.gpa, spec.size, fd, spec.offset, writable=not spec.readonly)
            except (OSError, ValueError, OverflowError, GuestMemoryError) as exc:
                raise ProtocolError(REFUSE_REGIONS, f"{what}: cannot be mapped: {exc}") from exc
    except BaseException:
        memory.close()
        raise
    return memory


def map_ioreq_page(fd: int) -> mmap.mmap:
    """Map the shared page of ioreq_t slots; it must be exactly one page."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ProtocolError(REFUSE_PAGE, f"ioreq page: fstat failed: {exc.strerror}") from exc
    _check_memory_fd(fd, IOREQ_PAGE_SIZE, "ioreq page", REFUSE_PAGE)
    if st.st_size != IOREQ_PAGE_SIZE:
        raise ProtocolError(REFUSE_PAGE, f"ioreq page: must be a memfd of exactly "
                                         f"{IOREQ_PAGE_SIZE} bytes, got {st.st_size}")
    try:
        return mmap.mmap(fd, IOREQ_PAGE_SIZE, flags=mmap.MAP_SHARED,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as exc:
        raise ProtocolError(REFUSE_PAGE, f"ioreq page: cannot be mapped: {exc}") from exc


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
