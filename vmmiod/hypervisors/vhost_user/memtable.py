"""The vhost-user memory table: the front-end's regions, mapped from their fds, as guest memory.

Regions arrive with SET_MEM_TABLE (all at once) or ADD_MEM_REG / REM_MEM_REG (one at a time),
each with a guest-physical address, a size, the front-end's own user address and an offset into
the fd. Buffers in descriptors are guest-physical; ring addresses (SET_VRING_ADDR) are the
front-end's user addresses and are translated here. Every region is checked before it is
mapped, by the rules of the generic channel (docs/generic-ioreq.md, "Memory fds"): touching a
mapping the file cannot back kills the daemon with SIGBUS, so only a memfd sealed against
shrinking (QEMU's memory-backend-memfd, whose default is seal=on), not on hugetlbfs, holding
the whole range, is mapped; and no region may overlap another in guest-physical or user space.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

from vmmiod.hypervisors.generic.fds import HUGETLBFS_MAGIC, fs_type
from vmmiod.hypervisors.vhost_user.wire import MemRegion, MessageError
from vmmiod.memory import ADDR_LIMIT, GuestMemoryError, MappedMemory, Region

MAX_MEM_SLOTS = 32  # answered to GET_MAX_MEM_SLOTS


@dataclass(frozen=True, slots=True)
class Slot:
    spec: MemRegion
    region: Region
    mapping: mmap.mmap


def check_memory_fd(fd: int, need: int, what: str) -> None:
    """A memfd sealed against shrinking, not on hugetlbfs, holding at least `need` bytes."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise MessageError("bad_memory_fd", f"{what}: fstat failed: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise MessageError("bad_memory_fd", f"{what}: the fd is not a memfd")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise MessageError("bad_memory_fd", f"{what}: not a memfd (a file cannot be sealed, "
                                            "so its owner could truncate it under the daemon; "
                                            "QEMU: use memory-backend-memfd)") from None
    if fs_type(fd) == HUGETLBFS_MAGIC:
        raise MessageError("bad_memory_fd", f"{what}: hugetlbfs memfds are refused (a punched "
                                            "hole faulted back with the huge page pool empty "
                                            "is SIGBUS)")
    if not seals & fcntl.F_SEAL_SHRINK:
        raise MessageError("bad_memory_fd", f"{what}: memfd not sealed against shrinking "
                                            "(QEMU: keep memory-backend-memfd's default "
                                            "seal=on)")
    if st.st_size < need:
        raise MessageError("bad_memory_fd", f"{what}: the memfd holds {st.st_size} bytes, "
                                            f"{need} needed")


class VhostMemory(MappedMemory):
    """Guest memory whose regions come and go with the front-end's memory table."""

    def __init__(self) -> None:
        super().__init__()
        self.slots: list[Slot] = []

    def add(self, spec: MemRegion, fd: int) -> bool:
        """Map one region from `fd` (the caller still owns and closes `fd`). False: the very
        same region is mapped already (QEMU sends each region once per vhost device, and a
        multiqueue net front-end has one per queue pair on one connection)."""
        what = f"region gpa {spec.gpa:#x} size {spec.size:#x}"
        if any(s.spec == spec for s in self.slots):
            return False
        if len(self.slots) >= MAX_MEM_SLOTS:
            raise MessageError("too_many_regions", f"{what}: {MAX_MEM_SLOTS} regions already")
        if spec.size == 0 or spec.gpa + spec.size > ADDR_LIMIT or \
                spec.uva + spec.size > ADDR_LIMIT or spec.mmap_offset + spec.size > ADDR_LIMIT:
            raise MessageError("bad_region", f"{what}: empty or wraps past 2**64")
        if spec.mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise MessageError("bad_region", f"{what}: mmap offset {spec.mmap_offset:#x} is not "
                                             "page aligned")
        for s in self.slots:
            o = s.spec
            if spec.gpa < o.gpa + o.size and o.gpa < spec.gpa + spec.size:
                raise MessageError("overlapping_regions", f"{what}: overlaps guest range "
                                                          f"{o.gpa:#x}+{o.size:#x}")
            if spec.uva < o.uva + o.size and o.uva < spec.uva + spec.size:
                raise MessageError("overlapping_regions", f"{what}: user address "
                                                          f"{spec.uva:#x} overlaps another region")
        check_memory_fd(fd, spec.mmap_offset + spec.size, what)
        try:
            m = mmap.mmap(fd, spec.size, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=spec.mmap_offset)
        except (OSError, ValueError, OverflowError) as exc:
            raise MessageError("bad_memory_fd", f"{what}: cannot be mapped: {exc}") from exc
        try:
            region = self.add_buffer(spec.gpa, m)
        except (GuestMemoryError, ValueError) as exc:
            m.close()
            raise MessageError("bad_region", f"{what}: {exc}") from exc
        self.slots.append(Slot(spec, region, m))
        self.invalidate()
        return True

    def remove(self, spec: MemRegion) -> None:
        """REM_MEM_REG: the region with this guest address, user address and size."""
        for s in self.slots:
            o = s.spec
            if (o.gpa, o.uva, o.size) == (spec.gpa, spec.uva, spec.size):
                break
        else:
            raise MessageError("unknown_region", f"no region gpa {spec.gpa:#x} size "
                                                 f"{spec.size:#x} uva {spec.uva:#x} to remove")
        self.slots.remove(s)
        self._regions.remove(s.region)
        self._last = None
        self._hot = (1, 0, memoryview(b""), False)
        self.invalidate()
        s.region.buf.release()
        try:
            s.mapping.close()
        except BufferError:  # a chain still holds a view; the GC unmaps it when that goes
            pass

    def uva_to_gpa(self, uva: int, length: int, what: str) -> int:
        """The guest-physical address of a front-end user address range (one region)."""
        for s in self.slots:
            o = s.spec
            if o.uva <= uva and uva + length <= o.uva + o.size:
                return o.gpa + (uva - o.uva)
        raise MessageError("ring_outside_memory", f"{what} at user address {uva:#x} "
                                                  f"(+{length:#x}) is in no memory region")

    def close(self) -> None:
        super().close()  # releases region views and closes nothing it does not own
        for s in self.slots:
            try:
                s.mapping.close()
            except BufferError:
                pass
        self.slots.clear()
