"""The MMIO bus: guest-physical address ranges to register windows.

The bus knows nothing of register meanings. It finds the window that owns an access, hands it
the offset, and applies one policy to everything no window can serve: reads answer all ones,
writes are dropped, the first occurrence of each kind is logged (`ioreq_unhandled`) and every
occurrence is counted. Guest memory arrives here from the adaptor and goes to every window.

A handful of windows (Xen allots at most 11 virtio-mmio devices per guest): a sorted list with
bisect, plus the last window hit, is faster than anything cleverer at that size.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from vmmiod.ioreq import (
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_INVALIDATE,
    IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO,
    IOREQ_TYPE_TIMEOFFSET,
    IoRequest,
    size_mask,
)
from vmmiod.memory import GuestMemory

ADDR_LIMIT = 1 << 64
_SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}

# Stable names of the kinds of request the bus answers without a window (log key `kind`).
UNHANDLED_REP = "rep"  # count > 1 (x86 string instructions)
UNHANDLED_DATA_IS_PTR = "data_is_ptr"  # data is a guest buffer address
UNHANDLED_PIO = "pio"
UNHANDLED_PCI_CONFIG = "pci_config"
UNHANDLED_TIMEOFFSET = "timeoffset"
UNHANDLED_UNKNOWN_TYPE = "unknown_type"
UNHANDLED_BAD_SIZE = "bad_size"  # not 1, 2, 4 or 8 bytes
UNHANDLED_SPANNING = "spanning"  # starts in a window and runs past its end
UNHANDLED_UNCLAIMED = "unclaimed"  # outside every window
UNHANDLED_WINDOW_ERROR = "window_error"  # a window raised (a bug; the guest still gets an answer)

_TYPE_KINDS = {
    IOREQ_TYPE_PIO: UNHANDLED_PIO,
    IOREQ_TYPE_PCI_CONFIG: UNHANDLED_PCI_CONFIG,
    IOREQ_TYPE_TIMEOFFSET: UNHANDLED_TIMEOFFSET,
}


class Window(Protocol):
    """What the bus needs of a register window (vmmiod.mmio.VirtioMmio is one)."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def attach(self, memory: GuestMemory) -> None: ...

    def detach(self) -> None: ...


class BusError(ValueError):
    """A window cannot be registered or unregistered as asked (a configuration problem)."""


class WindowRangeError(BusError):
    """The window's range is empty, negative or runs past 2**64."""


class WindowOverlapError(BusError):
    """The window's range overlaps one already registered."""


class UnknownWindowError(BusError):
    """No window is registered at that base."""


class MmioBus:
    """Address ranges to windows, and the policy for accesses no window serves."""

    def __init__(self, log: Any = None) -> None:
        self.log = log if log is not None else structlog.get_logger()
        self._bases: list[int] = []  # sorted window bases, for bisect
        self._entries: list[tuple[int, int, Window]] = []  # (base, end, window), same order
        # The last window hit, with its bound methods: the next access is almost always to it.
        self._last: tuple[int, int, Callable[[int, int], int],
                          Callable[[int, int, int], None]] | None = None
        self.memory: GuestMemory | None = None
        self.requests = 0
        self.invalidations = 0
        self.unhandled: dict[str, int] = {}

    # -- registration ------------------------------------------------------------------------------
    def register(self, base: int, size: int, window: Window) -> None:
        if base < 0 or size <= 0 or base + size > ADDR_LIMIT:
            raise WindowRangeError(f"window {base:#x}+{size:#x} is not a valid address range")
        end = base + size
        for b, e, _w in self._entries:
            if base < e and b < end:
                raise WindowOverlapError(
                    f"window {base:#x}-{end - 1:#x} overlaps the window at {b:#x}-{e - 1:#x}")
        i = bisect.bisect_left(self._bases, base)
        self._bases.insert(i, base)
        self._entries.insert(i, (base, end, window))
        if self.memory is not None:
            window.attach(self.memory)

    def unregister(self, base: int) -> Window:
        """Remove the window at `base` (detached from memory: its device is reset)."""
        i = bisect.bisect_left(self._bases, base)
        if i == len(self._bases) or self._bases[i] != base:
            raise UnknownWindowError(f"no window is registered at {base:#x}")
        del self._bases[i]
        _b, _e, window = self._entries.pop(i)
        self._last = None
        if self.memory is not None:
            window.detach()
        return window

    def windows(self) -> list[tuple[int, int, Window]]:
        """(base, size, window) in address order."""
        return [(b, e - b, w) for b, e, w in self._entries]

    # -- guest memory ------------------------------------------------------------------------------
    def attach_memory(self, memory: GuestMemory) -> None:
        self.memory = memory
        for _b, _e, w in self._entries:
            w.attach(memory)

    def detach_memory(self) -> None:
        """The VMM went away: every window resets its device and forgets the memory."""
        self.memory = None
        for _b, _e, w in self._entries:
            w.detach()

    # -- requests ----------------------------------------------------------------------------------
    def access(self, addr: int, size: int, is_write: bool, data: int = 0) -> int:
        """One plain MMIO access (the hot path). Returns the read value (0 for writes)."""
        self.requests += 1
        last = self._last
        if last is None or addr < last[0] or addr + size > last[1]:
            entry = self._lookup(addr, size)
            if entry is None:
                return self._unhandled_kind(addr, size, is_write)
            last = self._last = (entry[0], entry[1], entry[2].read, entry[2].write)
        mask = _SIZE_MASK.get(size)
        if mask is None:
            return self._unhandled(UNHANDLED_BAD_SIZE, addr, size, is_write)
        try:
            if is_write:
                last[3](addr - last[0], size, data & mask)
                return 0
            result: int = last[2](addr - last[0], size)
            return result & mask
        except Exception as exc:  # a window bug must not take the daemon (or the vCPU) down
            self.log.exception("window_error", addr=addr, size=size, write=is_write,
                               error=type(exc).__name__)
            self.unhandled[UNHANDLED_WINDOW_ERROR] = self.unhandled.get(
                UNHANDLED_WINDOW_ERROR, 0) + 1
            return 0 if is_write else mask

    def dispatch(self, req: IoRequest) -> int:
        """Any request. Returns (and stores in `req.data` for reads) the value read."""
        typ = req.type
        if typ == IOREQ_TYPE_COPY:
            if req.data_is_ptr:
                result = self._unhandled(UNHANDLED_DATA_IS_PTR, req.addr, req.size, req.is_write)
            elif req.count != 1:
                result = self._unhandled(UNHANDLED_REP, req.addr, req.size, req.is_write)
            else:
                result = self.access(req.addr, req.size, req.is_write, req.data)
        elif typ == IOREQ_TYPE_INVALIDATE:
            # Xen sends this (first thing on Arm) when guest memory may have been remapped.
            self.requests += 1
            self.invalidations += 1
            if self.memory is not None:
                self.memory.invalidate()
            result = 0
        else:
            kind = _TYPE_KINDS.get(typ, UNHANDLED_UNKNOWN_TYPE)
            result = self._unhandled(kind, req.addr, req.size, req.is_write, typ)
        if not req.is_write:
            req.data = result
        return result

    # -- what no window serves ---------------------------------------------------------------------
    def _lookup(self, addr: int, size: int) -> tuple[int, int, Window] | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        entry = self._entries[i]
        if addr >= entry[1] or addr + size > entry[1]:
            return None
        return entry

    def _unhandled_kind(self, addr: int, size: int, is_write: bool) -> int:
        i = bisect.bisect_right(self._bases, addr) - 1
        inside = i >= 0 and addr < self._entries[i][1]
        return self._unhandled(UNHANDLED_SPANNING if inside else UNHANDLED_UNCLAIMED,
                               addr, size, is_write)

    def _unhandled(self, kind: str, addr: int, size: int, is_write: bool,
                   typ: int = IOREQ_TYPE_COPY) -> int:
        n = self.unhandled.get(kind, 0) + 1
        self.unhandled[kind] = n
        if n == 1:  # once per kind: a guest can send these in a loop
            self.log.warning("ioreq_unhandled", kind=kind, addr=addr, size=size,
                             write=is_write, type=typ)
        return 0 if is_write else size_mask(size)

    def stats(self) -> dict[str, int]:
        out = {"requests": self.requests, "invalidations": self.invalidations}
        for kind, n in self.unhandled.items():
            out[f"unhandled_{kind}"] = n
        return out
