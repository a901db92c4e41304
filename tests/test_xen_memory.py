"""XenGuestMemory: lazy foreign and grant mappings, bounded cache, invalidation, safety.

The mapper here does what privcmd and gntdev do, with real memory: guest RAM is a memfd, a
"foreign mapping" maps its pages at fresh addresses (pages outside RAM stay PROT_NONE, so any
touch would crash this test process), grants map a table of (page, writable) the same way.
Unmapping is a real munmap: a view used after its mapping went away would crash too.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os

import pytest

from vmmiod.hypervisors.xen.guestmem import (
    CHUNK_PAGES,
    GRANT_BIT,
    PAGE_SIZE,
    XenGuestMemory,
)
from vmmiod.memory import NotContiguousError, OutOfBoundsError, ReadOnlyError

RAM_BASE = 0x4000_0000
RAM_PAGES = 40  # not a multiple of CHUNK_PAGES: the last chunk runs past the end of RAM

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FIXED = 0x10
PROT_NONE = 0
MAP_FAILED = ctypes.c_void_p(-1).value


class MemfdMapper:
    def __init__(self) -> None:
        self.fd = os.memfd_create("xen-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, RAM_PAGES * PAGE_SIZE)
        self.ram = mmap.mmap(self.fd, RAM_PAGES * PAGE_SIZE)
        self.grants: dict[int, tuple[int, bool]] = {}  # gref -> (RAM page, writable)
        self.live: dict[int, int] = {}  # addr -> pages
        self.maps: list[tuple[str, int, int, bool]] = []

    def _reserve(self, pages: int) -> int:
        addr = libc.mmap(None, pages * PAGE_SIZE, PROT_NONE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert addr not in (None, MAP_FAILED)
        self.live[addr] = pages
        return int(addr)

    def _alias(self, addr: int, ram_page: int, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        got = libc.mmap(addr, PAGE_SIZE, prot, mmap.MAP_SHARED | MAP_FIXED, self.fd,
                        ram_page * PAGE_SIZE)
        assert got == addr

    def map_foreign(self, first_gfn: int, pages: int, writable: bool) -> tuple[int, list[int]]:
        self.maps.append(("foreign", first_gfn, pages, writable))
        addr = self._reserve(pages)
        errs = []
        for i in range(pages):
            page = first_gfn + i - (RAM_BASE >> 12)
            if 0 <= page < RAM_PAGES:
                self._alias(addr + i * PAGE_SIZE, page, True)
                errs.append(0)
            else:
                errs.append(errno.EINVAL)
        return addr, errs

    def map_grants(self, first_ref: int, count: int, writable: bool) -> int:
        self.maps.append(("grant", first_ref, count, writable))
        for ref in range(first_ref, first_ref + count):
            if ref not in self.grants:
                raise OSError(errno.EINVAL, "no such grant")
            if writable and not self.grants[ref][1]:
                raise OSError(errno.EPERM, "read-only grant")
        addr = self._reserve(count)
        for i in range(count):
            self._alias(addr + i * PAGE_SIZE, self.grants[first_ref + i][0], writable)
        return addr

    def _unmap(self, addr: int, pages: int) -> None:
        assert self.live.pop(addr) == pages
        assert libc.munmap(addr, pages * PAGE_SIZE) == 0

    def unmap_foreign(self, addr: int, pages: int) -> None:
        self._unmap(addr, pages)

    def unmap_grants(self, addr: int, count: int) -> None:
        self._unmap(addr, count)


@pytest.fixture
def mapper() -> MemfdMapper:
    return MemfdMapper()


def test_foreign_reads_and_writes_alias_guest_ram(mapper: MemfdMapper) -> None:
    mem = XenGuestMemory(mapper)
    mapper.ram[5 * PAGE_SIZE + 12: 5 * PAGE_SIZE + 16] = b"virt"
    assert mem.read(RAM_BASE + 5 * PAGE_SIZE + 12, 4) == b"virt"
    mem.write_u32(RAM_BASE + 7 * PAGE_SIZE, 0xCAFEF00D)
    assert mapper.ram[7 * PAGE_SIZE: 7 * PAGE_SIZE + 4] == (0xCAFEF00D).to_bytes(4, "little")
    # One lazy chunk mapped for both accesses.
    assert mapper.maps == [("foreign", RAM_BASE >> 12, CHUNK_PAGES, True)]


def test_ring_across_a_chunk_edge_is_one_contiguous_view(mapper: MemfdMapper) -> None:
    mem = XenGuestMemory(mapper)
    gpa = RAM_BASE + (CHUNK_PAGES - 1) * PAGE_SIZE + 0x800  # 2 KiB before the edge
    mapper.ram[(CHUNK_PAGES - 1) * PAGE_SIZE + 0x800:(CHUNK_PAGES + 1) * PAGE_SIZE] = (
        bytes(range(256)) * 24)[:0x800 + PAGE_SIZE]
    view = mem.view(gpa, 0x1000)
    assert bytes(view) == (bytes(range(256)) * 24)[:0x1000]
    assert ("foreign", (RAM_BASE >> 12) + CHUNK_PAGES - 1, 2, True) in mapper.maps


def test_outside_ram_is_refused_without_touching_it(mapper: MemfdMapper) -> None:
    mem = XenGuestMemory(mapper)
    end = RAM_BASE + RAM_PAGES * PAGE_SIZE
    with pytest.raises(OutOfBoundsError):
        mem.read(end, 4)
    with pytest.raises(OutOfBoundsError):
        mem.read(end - 8, 16)  # runs into the hole
    with pytest.raises(OutOfBoundsError):
        mem.locate(end - 8, 16)
    with pytest.raises(OutOfBoundsError):
        mem.read(0x1000, 4)  # below RAM
    with pytest.raises(OutOfBoundsError):
        mem.read((1 << 64) - 8, 4)
    with pytest.raises(OutOfBoundsError):
        mem.read((1 << 64) - 2, 4)  # wraps
    assert mem.rejected >= 5
    assert mem.read(end - 4, 4) == b"\0\0\0\0"


def test_cache_is_bounded_and_lru(mapper: MemfdMapper) -> None:
    mem = XenGuestMemory(mapper, cache_pages=1)  # raised to the floor of 272 pages
    limit = mem.cache_pages
    # Touch far more distinct chunks than the bound, each in RAM or not (errors still map).
    for i in range(2 * limit // CHUNK_PAGES + 4):
        try:
            mem.read(RAM_BASE + i * CHUNK_PAGES * PAGE_SIZE, 1)
        except OutOfBoundsError:
            pass
        assert mem.mapped_pages <= limit
    assert mem.counters["evictions"] > 0
    assert mem.counters["unmaps"] == mem.counters["evictions"]
    assert len(mapper.live) * CHUNK_PAGES <= limit


def test_invalidate_drops_every_mapping_and_bumps_generation(mapper: MemfdMapper) -> None:
    mem = XenGuestMemory(mapper)
    mem.read(RAM_BASE, 4)
    mem.read(RAM_BASE + CHUNK_PAGES * PAGE_SIZE, 4)
    gen = mem.generation
    mem.invalidate()
    assert mem.generation == gen + 1
    assert mapper.live == {} and mem.mapped_pages == 0
    mem.read(RAM_BASE, 4)  # mapped again on demand
    assert len(mapper.live) == 1


def test_a_mapping_with_live_views_is_not_unmapped_until_they_die(mapper: MemfdMapper) -> None:
    mem = XenGuestMemory(mapper)
    held = mem.view(RAM_BASE + 100, 16, writable=True)  # e.g. a buffer of an I/O in flight
    buf, _off = mem.locate(RAM_BASE + 200, 8)  # e.g. a ring cached by a queue
    mem.invalidate()
    assert mem.counters["deferred_unmaps"] == 1
    assert len(mapper.live) == 1  # still mapped: the views are alive
    held[:4] = b"live"  # safe: the pages are still there
    assert mapper.ram[100:104] == b"live"
    del held
    mem.sweep()
    assert len(mapper.live) == 1  # `buf` still refers to it
    del buf
    mem.sweep()
    assert mapper.live == {}
    assert mem.counters["unmaps"] == 1


def test_grant_addresses_map_consecutive_refs(mapper: MemfdMapper) -> None:
    # Three consecutive grant refs pointing at scattered guest pages.
    mapper.grants = {40: (9, True), 41: (2, True), 42: (30, True)}
    mapper.ram[2 * PAGE_SIZE: 2 * PAGE_SIZE + 4] = b"two!"
    mem = XenGuestMemory(mapper, grants=True)
    assert mem.access_platform
    addr = GRANT_BIT | 40 << 12 | 0xFF0  # 16 bytes before the end of ref 40's page
    mem.write(addr, b"A" * 16 + b"two?")
    assert mapper.ram[9 * PAGE_SIZE + 0xFF0: 9 * PAGE_SIZE + 0x1000] == b"A" * 16
    assert mapper.ram[2 * PAGE_SIZE: 2 * PAGE_SIZE + 4] == b"two?"
    assert ("grant", 40, 2, True) in mapper.maps  # offset counted: 2 pages, not 1
    view = mem.view(GRANT_BIT | 41 << 12, 2 * PAGE_SIZE)
    assert len(view) == 2 * PAGE_SIZE


def test_read_only_grants_map_read_only(mapper: MemfdMapper) -> None:
    mapper.grants = {7: (3, False)}
    mapper.ram[3 * PAGE_SIZE: 3 * PAGE_SIZE + 5] = b"hello"
    mem = XenGuestMemory(mapper, grants=True)
    assert mem.read(GRANT_BIT | 7 << 12, 5) == b"hello"
    assert ("grant", 7, 1, False) in mapper.maps
    view = mem.view(GRANT_BIT | 7 << 12, 5)
    assert view.readonly
    with pytest.raises(ReadOnlyError):
        mem.write(GRANT_BIT | 7 << 12, b"x")
    del view


def test_grant_mode_refuses_plain_addresses_and_unknown_refs(mapper: MemfdMapper) -> None:
    mapper.grants = {1: (0, True)}
    mem = XenGuestMemory(mapper, grants=True)
    with pytest.raises(OutOfBoundsError):
        mem.read(RAM_BASE, 4)
    with pytest.raises(OutOfBoundsError):
        mem.read(GRANT_BIT | 99 << 12, 4)
    with pytest.raises(OutOfBoundsError):
        mem.read(GRANT_BIT | ((1 << 32) - 1) << 12, 2 * PAGE_SIZE)  # refs past 2**32


def test_grants_are_released_by_the_sweep_when_unreferenced(mapper: MemfdMapper) -> None:
    mapper.grants = {5: (1, True), 6: (4, True)}
    mem = XenGuestMemory(mapper, grants=True)

    async def scenario() -> None:
        mem.read(GRANT_BIT | 5 << 12, 8)
        kept = mem.view(GRANT_BIT | 6 << 12, 8)
        assert len(mapper.live) == 2
        await asyncio.sleep(0)  # the sweep scheduled by the lookups runs
        await asyncio.sleep(0)
        assert len(mapper.live) == 1  # ref 5 released so the guest can revoke it
        del kept
        await asyncio.sleep(0.2)  # the follow-up sweep
        assert mapper.live == {}

    asyncio.run(scenario())


def test_not_contiguous_beyond_the_largest_structure(mapper: MemfdMapper) -> None:
    mem = XenGuestMemory(mapper)
    with pytest.raises((NotContiguousError, OutOfBoundsError)):
        mem.locate(RAM_BASE, 300 * PAGE_SIZE)


def test_close_unmaps_everything(mapper: MemfdMapper) -> None:
    mem = XenGuestMemory(mapper)
    for i in range(3):
        mem.read(RAM_BASE + i * CHUNK_PAGES * PAGE_SIZE, 1)
    mem.close()
    assert mapper.live == {}
