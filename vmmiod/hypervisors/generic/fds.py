"""Checks on the file descriptors a VMM hands over, and mapping them (daemon side).

Every check here protects the daemon from its peer: an fd of the wrong kind, a memory fd shorter
than the range to map (touching it would kill the daemon with SIGBUS), or a memfd the VMM could
still shrink later (same SIGBUS, later) is refused before anything is mapped.
"""

from __future__ import annotations

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


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == EVENTFD_LINK
    except OSError:
        return False


def check_eventfd(fd: int, what: str) -> None:
    if not is_eventfd(fd):
        raise ProtocolError(REFUSE_BAD_FD, f"{what}: fd is not an eventfd")


def _check_memory_fd(fd: int, need: int, what: str, reason: int) -> int:
    """A regular file (memfd or file) holding at least `need` bytes; returns its size."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ProtocolError(reason, f"{what}: fstat failed: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(reason, f"{what}: not a memfd or regular file")
    if st.st_size < need:
        raise ProtocolError(reason, f"{what}: file holds {st.st_size} bytes, {need} needed")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = None  # not a memfd: a file the VMM owns (see docs/generic-ioreq.md)
    if seals is not None and not seals & fcntl.F_SEAL_SHRINK:
        raise ProtocolError(reason, f"{what}: memfd is not sealed against shrinking "
                                    f"(F_SEAL_SHRINK); create it with MFD_ALLOW_SEALING, "
                                    f"then seal it")
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
    if not stat.S_ISREG(st.st_mode) or st.st_size != IOREQ_PAGE_SIZE:
        raise ProtocolError(REFUSE_PAGE, f"ioreq page: must be a memfd of exactly "
                                         f"{IOREQ_PAGE_SIZE} bytes, got {st.st_size}")
    _check_memory_fd(fd, IOREQ_PAGE_SIZE, "ioreq page", REFUSE_PAGE)
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
