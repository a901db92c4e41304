"""Guest memory on Xen: foreign mappings (gpa) or grant mappings (bit 63), mapped lazily.

Foreign mode maps guest frames by aligned chunks of CHUNK_PAGES on first touch and keeps them in
an LRU bounded by `cache_pages`. A structure that must be contiguous (a ring) and crosses a
chunk edge gets its own mapping of exactly the pages it covers. Pages Xen refused to map (not
guest RAM) are never covered by a view: touching them would fault the daemon.

Grant mode (Linux xen-grant-dma, Linux >= 5.19): an address with bit 63 set is
`gref << 12 | offset`; a buffer spanning pages uses consecutive grant refs. Buffers the driver
only reads are granted read-only, so they are mapped PROT_READ (the `writable` argument of
`_lookup`). Grant mappings are released as soon as nothing refers to them (a sweep scheduled on
the loop), because the guest cannot revoke a grant we still map.

A mapping is unmapped only when no memoryview of it is alive: every view handed out shares one
managed buffer whose exporter is the mapping's ctypes array, so the array's reference count
tells whether any view (a queued I/O, a cached ring) still points into it. Mappings still in use
are kept aside and retried at the next sweep; unmapping under a live view would crash the daemon
on its next access.
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Protocol

from vmmiod.memory import GuestMemory, OutOfBoundsError, ReadOnlyError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
GRANT_BIT = 1 << 63
CHUNK_SHIFT = 4  # 16 pages = 64 KiB per lazy mapping
CHUNK_PAGES = 1 << CHUNK_SHIFT
MAX_CONTIGUOUS_PAGES = 256  # largest single structure mapped in one piece (1 MiB)
MAX_GRANT_PAGES = 64  # grant refs mapped per call; longer buffers come in pieces via views()
MAX_GFN = (1 << 52) - 1  # gpa space is 64 bits; frames beyond never exist

_BASE_REFS = 2  # the mapping's own reference plus getrefcount's argument


class Mapper(Protocol):
    """The hypervisor calls behind XenGuestMemory (real: XenMapper; tests: real mmap memory)."""

    def map_foreign(self, first_gfn: int, pages: int, writable: bool) -> tuple[int, list[int]]:
        ...

    def unmap_foreign(self, addr: int, pages: int) -> None: ...

    def map_grants(self, first_ref: int, count: int, writable: bool) -> int: ...

    def unmap_grants(self, addr: int, count: int) -> None: ...


class _Mapping:
    """One mapped range: `pages` frames from `first` (gfn or gref) at `addr`."""

    __slots__ = ("addr", "arr", "first", "grant", "pages", "run_end", "view", "writable")

    def __init__(self, first: int, pages: int, addr: int, errs: list[int] | None,
                 writable: bool, grant: bool) -> None:
        self.first = first
        self.pages = pages
        self.addr = addr
        self.writable = writable
        self.grant = grant
        self.arr: Any = (ctypes.c_char * (pages * PAGE_SIZE)).from_address(addr)
        view = memoryview(self.arr).cast("B")
        self.view: memoryview | None = view if writable else view.toreadonly()
        # run_end[i]: index of the first unusable page at or after page i (pages if none).
        end = pages
        run = [pages] * pages
        for i in range(pages - 1, -1, -1):
            if errs is not None and errs[i]:
                end = i
            run[i] = end
        self.run_end = run

    def in_use(self) -> bool:
        """True while a memoryview of this mapping exists outside the cache."""
        self.view = None
        return sys.getrefcount(self.arr) > _BASE_REFS


class XenGuestMemory(GuestMemory):
    """Lazy foreign or grant mappings of one guest's memory."""

    def __init__(self, mapper: Mapper, *, grants: bool = False, cache_pages: int = 16384,
                 log: Any = None) -> None:
        super().__init__()
        self.access_platform = grants
        self.grants = grants
        self._mapper = mapper
        self.cache_pages = max(cache_pages, MAX_CONTIGUOUS_PAGES + CHUNK_PAGES)
        self.log = log
        self._cache: OrderedDict[Hashable, _Mapping] = OrderedDict()
        self._cached_pages = 0
        self._retired: list[_Mapping] = []  # out of the cache, still referenced by a view
        self._sweep_scheduled = False
        self.counters = {"maps": 0, "unmaps": 0, "map_failures": 0, "deferred_unmaps": 0,
                         "evictions": 0}

    # -- lookup -----------------------------------------------------------------------------------
    def _lookup(self, gpa: int, length: int, writable: bool) -> tuple[memoryview, int, int]:
        if self.grants:
            if not gpa & GRANT_BIT:
                self.rejected += 1
                raise OutOfBoundsError(f"address {gpa:#x} is not a grant address (bit 63 clear)")
            return self._lookup_grant(gpa & ~GRANT_BIT, length, writable)
        gfn = gpa >> PAGE_SHIFT
        chunk = gfn >> CHUNK_SHIFT
        m = self._cache.get(chunk)
        if m is None:
            m = self._map(chunk, chunk << CHUNK_SHIFT, CHUNK_PAGES, True, False)
        else:
            self._cache.move_to_end(chunk)
        buf, off, avail = self._resolve(m, gpa - (m.first << PAGE_SHIFT), gpa)
        if avail >= length:
            return buf, off, avail
        if m.run_end[off >> PAGE_SHIFT] != m.pages:
            self.rejected += 1
            raise OutOfBoundsError(f"range {gpa:#x}+{length:#x} runs out of guest memory")
        # Runs past the chunk edge (not into a hole): map exactly the pages it covers so a
        # ring crossing the edge is still one contiguous view. Longer ranges come in pieces.
        pages = ((gpa & PAGE_MASK) + length + PAGE_MASK) >> PAGE_SHIFT
        if pages > MAX_CONTIGUOUS_PAGES:
            return buf, off, avail
        key = ("extent", gfn, pages)
        e = self._cache.get(key)
        if e is None:
            e = self._map(key, gfn, pages, True, False)
        else:
            self._cache.move_to_end(key)
        return self._resolve(e, gpa & PAGE_MASK, gpa)

    def _lookup_grant(self, addr: int, length: int, writable: bool) -> tuple[memoryview, int, int]:
        gref = addr >> PAGE_SHIFT
        in_page = addr & PAGE_MASK
        pages = min(((in_page + max(length, 1) + PAGE_MASK) >> PAGE_SHIFT), MAX_GRANT_PAGES)
        if gref + pages > 1 << 32:
            self.rejected += 1
            raise OutOfBoundsError(f"grant reference {gref:#x}+{pages} is out of range")
        key = ("grant", gref, writable)
        m = self._cache.get(key)
        if m is not None and m.pages < pages:
            self._retire(key)
            m = None
        if m is None:
            m = self._map(key, gref, pages, writable, True)
        self._schedule_sweep()
        return self._resolve(m, in_page, addr | GRANT_BIT)

    def _resolve(self, m: _Mapping, off: int, gpa: int) -> tuple[memoryview, int, int]:
        page = off >> PAGE_SHIFT
        end = m.run_end[page]
        if end == page:
            self.rejected += 1
            raise OutOfBoundsError(f"address {gpa:#x} is not guest memory Xen would map")
        view = m.view
        assert view is not None
        return view, off, (end << PAGE_SHIFT) - off

    # -- mapping ----------------------------------------------------------------------------------
    def _map(self, key: Hashable, first: int, pages: int, writable: bool,
             grant: bool) -> _Mapping:
        if not grant and first + pages - 1 > MAX_GFN:
            self.rejected += 1
            raise OutOfBoundsError(f"frame {first:#x}+{pages} is outside the address space")
        try:
            if grant:
                addr = self._mapper.map_grants(first, pages, writable)
                errs = None
            else:
                addr, errs = self._mapper.map_foreign(first, pages, writable)
        except OSError as exc:
            self.counters["map_failures"] += 1
            self.rejected += 1
            if grant and writable:
                # The driver granted this buffer read-only, or not at all.
                raise ReadOnlyError(
                    f"grant {first:#x}+{pages} cannot be mapped writable: {exc}") from None
            raise OutOfBoundsError(
                f"{'grant' if grant else 'frame'} {first:#x}+{pages} cannot be mapped: {exc}"
            ) from None
        self.counters["maps"] += 1
        m = _Mapping(first, pages, addr, errs, writable, grant)
        self._cache[key] = m
        self._cached_pages += pages
        self._evict()
        return m

    def _evict(self) -> None:
        while self._cached_pages > self.cache_pages and len(self._cache) > 1:
            key = next(iter(self._cache))
            self.counters["evictions"] += 1
            self._retire(key)

    def _retire(self, key: Hashable) -> None:
        m = self._cache.pop(key)
        self._cached_pages -= m.pages
        if not self._release(m):
            self._retired.append(m)
            self.counters["deferred_unmaps"] += 1
            self._schedule_sweep()

    def _release(self, m: _Mapping) -> bool:
        """Unmap `m` unless a view still points into it. True when it is gone."""
        if m.in_use():
            return False
        try:
            if m.grant:
                self._mapper.unmap_grants(m.addr, m.pages)
            else:
                self._mapper.unmap_foreign(m.addr, m.pages)
        except OSError as exc:  # leaves the pages mapped: a leak, never a fault
            if self.log is not None:
                self.log.warning("guest_memory_unmap_failed", error=str(exc), pages=m.pages)
        m.arr = None
        self.counters["unmaps"] += 1
        return True

    def _schedule_sweep(self) -> None:
        if self._sweep_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sweep_scheduled = True
        loop.call_soon(self.sweep)

    def sweep(self) -> None:
        """Unmap grant mappings nothing refers to, and retired mappings that became free."""
        self._sweep_scheduled = False
        for key in [k for k, m in self._cache.items() if m.grant]:
            m = self._cache[key]
            if not m.in_use():
                del self._cache[key]
                self._cached_pages -= m.pages
                self._release(m)
            else:
                m.view = _fresh_view(m)
        self._retired = [m for m in self._retired if not self._release(m)]
        if self._retired or any(m.grant for m in self._cache.values()):
            self._schedule_sweep_later()

    def _schedule_sweep_later(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sweep_scheduled = True
        loop.call_later(0.05, self.sweep)

    # -- lifecycle --------------------------------------------------------------------------------
    def invalidate(self) -> None:
        """Xen INVALIDATE: the guest's physmap changed; forget every mapping."""
        super().invalidate()
        for key in list(self._cache):
            self._retire(key)

    def close(self) -> None:
        self.invalidate()
        self._retired = [m for m in self._retired if not self._release(m)]
        if self._retired and self.log is not None:
            # Still referenced at shutdown (e.g. ring views a reset queue kept): left mapped,
            # which is safe; the process exit unmaps them.
            self.log.info("guest_memory_mappings_in_use", count=len(self._retired))

    @property
    def mapped_pages(self) -> int:
        return self._cached_pages


def _fresh_view(m: _Mapping) -> memoryview:
    view = memoryview(m.arr).cast("B")
    return view if m.writable else view.toreadonly()


class XenMapper:
    """The real mapper: libxenforeignmemory for frames, libxengnttab for grants."""

    def __init__(self, domid: int, fmem: Any, gnttab_factory: Any = None) -> None:
        self.domid = domid
        self._fmem = fmem
        self._gnttab_factory = gnttab_factory
        self._gnttab: Any = None

    def map_foreign(self, first_gfn: int, pages: int, writable: bool) -> tuple[int, list[int]]:
        from vmmiod.hypervisors.xen.handles import PROT_READ, PROT_WRITE

        prot = PROT_READ | (PROT_WRITE if writable else 0)
        addr, errs = self._fmem.map(self.domid, first_gfn, pages, prot)
        return int(addr), errs

    def unmap_foreign(self, addr: int, pages: int) -> None:
        self._fmem.unmap(addr, pages)

    def _grants(self) -> Any:
        # Opened on first use: xentoolcore_restrict_all() closes grant handles that exist when
        # it runs (gntdev cannot be restricted), so the handle must be opened after it.
        if self._gnttab is None:
            if self._gnttab_factory is None:
                raise OSError(95, "grant mapping is not available")
            self._gnttab = self._gnttab_factory()
        return self._gnttab

    def map_grants(self, first_ref: int, count: int, writable: bool) -> int:
        from vmmiod.hypervisors.xen.handles import PROT_READ, PROT_WRITE

        prot = PROT_READ | (PROT_WRITE if writable else 0)
        return int(self._grants().map_refs(self.domid, first_ref, count, prot))

    def unmap_grants(self, addr: int, count: int) -> None:
        self._grants().unmap(addr, count)

    def close(self) -> None:
        if self._gnttab is not None:
            self._gnttab.close()
            self._gnttab = None
