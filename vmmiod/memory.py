"""Guest memory: guest-physical ranges to memoryviews, with every bound checked.

Everything here treats addresses as untrusted guest input. A range outside the regions, one
that wraps past 2**64, or a write to a read-only region raises a named error and is counted;
nothing ever touches memory outside a region's buffer.

Two kinds of memory exist:
- `MappedMemory`: regions that are already mapped (memfd/mmap from the generic channel, or any
  writable buffer in tests).
- Adaptors that map lazily (Xen foreign or grant mapping) subclass `GuestMemory` and implement
  `_lookup()`; `invalidate()` drops their cache and bumps `generation`, so holders of cached
  views (the virtqueues) know to look them up again.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from dataclasses import dataclass

U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

# Guest memory is little-endian (VIRTIO 1.x, Xen's ioreq_t); the single-store helpers below use
# native-order memoryview casts, which is only right on a little-endian host (x86-64, arm64).
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("vmmiod runs on little-endian hosts only")


# struct.pack_into zero-fills its target before it writes the value (CPython's
# s_pack_internal starts with a memset), so a field that the other side reads concurrently
# (a ring index, flags, avail_event) would be seen as 0 for a moment: Linux then takes a used
# index of 0 for thousands of new entries ("id N is not a head!"). Stores of shared fields go
# through a memoryview cast instead: one aligned store of the whole value.
def store_u16(buf: memoryview, off: int, value: int) -> None:
    """One 16-bit little-endian store at buf[off] (never a transient zero)."""
    buf[off:off + 2].cast("H")[0] = value & 0xFFFF


def store_u32(buf: memoryview, off: int, value: int) -> None:
    buf[off:off + 4].cast("I")[0] = value & 0xFFFFFFFF


def store_u64(buf: memoryview, off: int, value: int) -> None:
    buf[off:off + 8].cast("Q")[0] = value & 0xFFFFFFFFFFFFFFFF

ADDR_LIMIT = 1 << 64
PAGE_SIZE = 4096


class GuestMemoryError(Exception):
    """Base of every guest-memory error; the device above fails the request or resets."""


class OutOfBoundsError(GuestMemoryError):
    """The range is not (entirely) inside guest memory."""


class AddressWrapError(OutOfBoundsError):
    """gpa + length wraps past 2**64."""


class ReadOnlyError(GuestMemoryError):
    """A write was asked of a region (or grant) mapped read-only."""


class NotContiguousError(GuestMemoryError):
    """A structure that must be contiguous (a ring) spans two regions."""


@dataclass(frozen=True, slots=True)
class Region:
    """One guest-physical range backed by a buffer."""

    gpa: int
    size: int
    buf: memoryview  # format "B", len == size
    writable: bool = True

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Base class: the lookup strategy is the subclass's, the checks are here.

    `_lookup(gpa, length, writable)` returns `(buf, offset, avail)`: a buffer holding `gpa` at
    `offset` with `avail` bytes readable from there (at least 1), or raises.
    """

    # Set by adaptors whose guest addresses are not guest-physical (Xen grants): devices then
    # offer VIRTIO_F_ACCESS_PLATFORM.
    access_platform: bool = False

    def __init__(self) -> None:
        self.generation = 0
        self.rejected = 0  # accesses refused (outside memory, wrap, read-only)

    # -- subclass hooks -------------------------------------------------------------------------
    def _lookup(self, gpa: int, length: int, writable: bool) -> tuple[memoryview, int, int]:
        raise NotImplementedError

    def invalidate(self) -> None:
        """Drop cached mappings (Xen INVALIDATE). Cached views must be looked up again."""
        self.generation += 1

    def close(self) -> None:
        """Release every mapping; the memory is unusable afterwards."""

    # -- checked access -------------------------------------------------------------------------
    def _check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > ADDR_LIMIT:
            self.rejected += 1
            raise AddressWrapError(f"range {gpa:#x}+{length:#x} wraps past 2**64")

    def locate(self, gpa: int, length: int, writable: bool = False) -> tuple[memoryview, int]:
        """Return (buffer, offset) such that buffer[offset:offset+length] is the range.

        The range must be contiguous in one mapping. Cheapest form for struct.unpack_from.
        """
        self._check(gpa, length)
        buf, off, avail = self._lookup(gpa, length, writable)
        if avail < length:
            self.rejected += 1
            raise NotContiguousError(f"range {gpa:#x}+{length:#x} is not contiguous")
        return buf, off

    def view(self, gpa: int, length: int, writable: bool = False) -> memoryview:
        """A contiguous memoryview of the range (no copy)."""
        buf, off = self.locate(gpa, length, writable)
        return buf[off : off + length]

    def views(self, gpa: int, length: int, writable: bool = False) -> list[memoryview]:
        """Memoryviews covering the range, one per contiguous piece (no copy)."""
        self._check(gpa, length)
        out: list[memoryview] = []
        if length == 0:
            return out
        while True:
            buf, off, avail = self._lookup(gpa, length, writable)
            if avail >= length:
                out.append(buf[off : off + length])
                return out
            out.append(buf[off : off + avail])
            gpa += avail
            length -= avail

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(self.views(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        pos = 0
        for v in self.views(gpa, len(data), writable=True):
            n = len(v)
            v[:] = data[pos : pos + n]
            pos += n

    def read_u16(self, gpa: int) -> int:
        buf, off = self.locate(gpa, 2)
        value: int = U16.unpack_from(buf, off)[0]
        return value

    def read_u32(self, gpa: int) -> int:
        buf, off = self.locate(gpa, 4)
        value: int = U32.unpack_from(buf, off)[0]
        return value

    def read_u64(self, gpa: int) -> int:
        buf, off = self.locate(gpa, 8)
        value: int = U64.unpack_from(buf, off)[0]
        return value

    def write_u16(self, gpa: int, value: int) -> None:
        buf, off = self.locate(gpa, 2, True)
        store_u16(buf, off, value)

    def write_u32(self, gpa: int, value: int) -> None:
        buf, off = self.locate(gpa, 4, True)
        store_u32(buf, off, value)

    def write_u64(self, gpa: int, value: int) -> None:
        buf, off = self.locate(gpa, 8, True)
        store_u64(buf, off, value)


_NO_REGION: tuple[int, int, memoryview, bool] = (1, 0, memoryview(b""), False)  # matches nothing


class MappedMemory(GuestMemory):
    """Guest memory whose regions are all mapped up front (memfd/mmap, or plain buffers)."""

    def __init__(self, regions: list[Region] | None = None) -> None:
        super().__init__()
        self._regions: list[Region] = []
        self._last: Region | None = None
        # The last region hit as plain values (start, end, buffer, writable): the fast paths
        # of locate() and views() test a range against it without attribute lookups.
        self._hot: tuple[int, int, memoryview, bool] = _NO_REGION
        self._owned: list[mmap.mmap] = []
        for r in regions or []:
            self.add_region(r)

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    def add_region(self, region: Region) -> None:
        if region.size <= 0 or region.gpa < 0 or region.end > ADDR_LIMIT:
            raise OutOfBoundsError(f"region {region.gpa:#x}+{region.size:#x} is not valid")
        if len(region.buf) != region.size:
            raise ValueError("region buffer size does not match region size")
        for r in self._regions:
            if region.gpa < r.end and r.gpa < region.end:
                raise OutOfBoundsError(
                    f"region {region.gpa:#x}+{region.size:#x} overlaps {r.gpa:#x}+{r.size:#x}"
                )
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.gpa)

    def add_buffer(self, gpa: int, buf: bytearray | mmap.mmap | memoryview,
                   writable: bool = True) -> Region:
        mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
        region = Region(gpa, len(mv), mv, writable)
        self.add_region(region)
        return region

    def map_fd(self, gpa: int, size: int, fd: int, offset: int = 0,
               writable: bool = True) -> Region:
        """Map `size` bytes of a memfd/file at `offset` as guest RAM at `gpa` (shared)."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
        try:
            region = self.add_buffer(gpa, m, writable)
        except Exception:
            m.close()
            raise
        self._owned.append(m)
        return region

    def locate(self, gpa: int, length: int, writable: bool = False) -> tuple[memoryview, int]:
        # Hot path (rings, indirect tables, headers): the last region hit, whole range inside it.
        start, end, buf, w = self._hot
        if start <= gpa and gpa + length <= end and length >= 0 and (w or not writable):
            return buf, gpa - start
        return super().locate(gpa, length, writable)

    def views(self, gpa: int, length: int, writable: bool = False) -> list[memoryview]:
        # Hot path (every buffer of every chain): the last region hit, whole range inside it.
        start, end, buf, w = self._hot
        if start <= gpa and gpa + length <= end and length > 0 and (w or not writable):
            off = gpa - start
            return [buf[off:off + length]]
        return super().views(gpa, length, writable)

    def _lookup(self, gpa: int, length: int, writable: bool) -> tuple[memoryview, int, int]:
        r = self._last
        if r is None or not (r.gpa <= gpa < r.gpa + r.size):
            for r in self._regions:
                if r.gpa <= gpa < r.gpa + r.size:
                    self._last = r
                    self._hot = (r.gpa, r.gpa + r.size, r.buf, r.writable)
                    break
            else:
                self.rejected += 1
                raise OutOfBoundsError(f"address {gpa:#x} (+{length:#x}) is outside guest memory")
        if writable and not r.writable:
            self.rejected += 1
            raise ReadOnlyError(f"address {gpa:#x} is in a read-only region")
        off = gpa - r.gpa
        avail = r.size - off
        if avail < length:
            # Only acceptable when the next region continues exactly here.
            nxt = gpa + avail
            if not any(o.gpa == nxt for o in self._regions):
                self.rejected += 1
                raise OutOfBoundsError(
                    f"range {gpa:#x}+{length:#x} runs past the end of guest memory"
                )
        return r.buf, off, avail

    def close(self) -> None:
        self._last = None
        self._hot = _NO_REGION
        for r in self._regions:
            r.buf.release()
        self._regions.clear()
        for m in self._owned:
            try:
                m.close()
            except BufferError:  # a view is still exported somewhere; the GC will unmap it
                pass
        self._owned.clear()


def memfd_memory(size: int, gpa: int = 0x4000_0000, name: str = "vmmiod-guest") -> tuple[MappedMemory, int]:
    """A MappedMemory backed by a fresh memfd; returns (memory, fd). The caller owns fd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mem = MappedMemory()
    mem.map_fd(gpa, size, fd)
    return mem, fd
