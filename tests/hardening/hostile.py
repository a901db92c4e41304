"""A hostile guest's workbench: the whole device stack over guarded, audited guest memory.

Used by the fuzzing campaign (tests/hardening/) and nothing in the daemon (a test helper: it
ships in no package). It builds what the
daemon builds for one guest (an MmioBus, one VirtioMmio window per device, block on an image
file, net on the dgram backend, console on a Unix socket and a file) and gives the guest side
the means to prove three things after every move:

- nothing outside guest memory changed: every region lives inside a larger bytearray with guard
  bytes before and after it (`GuardedMemory.guards_intact`);
- every device access went through the memory layer's checks: `locate()` and `views()` are
  audited (the buffer and offset handed out are re-derived from the address of the region's
  bytes, independently of the layer's own arithmetic), and every byte of guest RAM that changed
  while the devices ran must lie in a range handed out as writable (`changed_outside`);
- no chain walk exceeded its budget: `WalkMeter` counts the descriptors each walk reads.

`BusVmm` lets the simulated guest's Linux-like transport driver (vmmiod/sim/virtio_mmio.py)
drive the bus directly, so well-behaved and hostile moves mix freely.

Asynchrony: `HeldCompletions` parks a device's completions (block: the I/O engine's handler,
through which finished ops reach `BlockDevice._completed` on the loop) for a seeded random
number of moves, so resets, queue
disables and disconnects run while work is in flight; `StalledWrites` makes console backends
take nothing until released, so transmit chains stay pending across the same moves.
"""

from __future__ import annotations

import ctypes
import random
import struct
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from vmmiod.memory import MappedMemory, Region
from vmmiod.virtqueue import split as split_module  # the codec WalkMeter stands in for

GUARD_SIZE = 4096
GUARD_PATTERN = bytes((i * 131 + 7) & 0xFF for i in range(GUARD_SIZE))  # not a fill a bug makes


def _address(buf: Any) -> int:
    """The address of the first byte of a writable buffer (bytearray or memoryview)."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


@dataclass
class _Backing:
    region: Region
    raw: bytearray  # guard + region + guard
    base_addr: int  # address of the region's first byte inside `raw`


class AuditError(AssertionError):
    """The memory layer handed out a buffer that is not exactly the asked range of a region."""


class GuardedMemory(MappedMemory):
    """MappedMemory whose regions sit between guard bytes, with every lookup audited."""

    def __init__(self, layout: list[tuple[int, int, bool]]) -> None:
        super().__init__()
        self.backings: list[_Backing] = []
        self.audited = 0  # locate()/views() calls checked
        for gpa, size, writable in layout:
            raw = bytearray(GUARD_SIZE + size + GUARD_SIZE)
            raw[:GUARD_SIZE] = GUARD_PATTERN
            raw[-GUARD_SIZE:] = GUARD_PATTERN
            region = self.add_buffer(gpa, memoryview(raw)[GUARD_SIZE:GUARD_SIZE + size], writable)
            self.backings.append(_Backing(region, raw, _address(raw) + GUARD_SIZE))
        # One byte per byte of guest memory: 1 once it was handed out writable.
        self.handed_writable = {b.region.gpa: bytearray(b.region.size) for b in self.backings}
        self.guest = GuestAlias(self)

    # -- the audit ----------------------------------------------------------------------------------
    def _backing_of(self, gpa: int) -> _Backing | None:
        for b in self.backings:
            if b.region.gpa <= gpa < b.region.end:
                return b
        return None

    def _audit(self, gpa: int, addr: int, length: int, writable: bool) -> None:
        b = self._backing_of(gpa)
        if b is None:
            raise AuditError(f"{gpa:#x}+{length:#x} handed out but outside every region")
        off = gpa - b.region.gpa
        if addr != b.base_addr + off or off + length > b.region.size:
            raise AuditError(f"{gpa:#x}+{length:#x}: buffer at {addr:#x} is not that range")
        if writable:
            if not b.region.writable:
                raise AuditError(f"{gpa:#x}+{length:#x}: a read-only region handed out writable")
            self.handed_writable[b.region.gpa][off:off + length] = b"\x01" * length
        self.audited += 1

    def locate(self, gpa: int, length: int, writable: bool = False) -> tuple[memoryview, int]:
        buf, off = super().locate(gpa, length, writable)
        if length:
            self._audit(gpa, _address(buf[off:off + length]), length, writable)
        return buf, off

    def views(self, gpa: int, length: int, writable: bool = False) -> list[memoryview]:
        out = super().views(gpa, length, writable)
        pos = gpa
        for v in out:
            if len(v):
                self._audit(pos, _address(v), len(v), writable)
            pos += len(v)
        if pos != gpa + length:
            raise AuditError(f"{gpa:#x}+{length:#x}: views cover {pos - gpa:#x} bytes")
        return out

    # -- what the tests look at ---------------------------------------------------------------------
    def guards_intact(self) -> bool:
        return all(b.raw[:GUARD_SIZE] == GUARD_PATTERN and b.raw[-GUARD_SIZE:] == GUARD_PATTERN
                   for b in self.backings)

    def snapshot(self) -> list[bytes]:
        return [bytes(b.raw) for b in self.backings]

    def changed_outside(self, before: list[bytes]) -> list[str]:
        """Ranges changed since `before` that were never handed out writable (should be none)."""
        problems: list[str] = []
        for b, old in zip(self.backings, before):
            raw = b.raw
            if raw == old:
                continue
            mask = self.handed_writable[b.region.gpa]
            dirty = self.guest.dirty[b.region.gpa]
            for block in range(0, len(raw), 65536):  # two levels: most of memory is unchanged
                if raw[block:block + 65536] == old[block:block + 65536]:
                    continue
                for chunk in range(block, min(block + 65536, len(raw)), 256):
                    if raw[chunk:chunk + 256] == old[chunk:chunk + 256]:
                        continue
                    for i in range(chunk, min(chunk + 256, len(raw))):
                        if raw[i] == old[i]:
                            continue
                        off = i - GUARD_SIZE
                        if not 0 <= off < b.region.size or not (mask[off] or dirty[off]):
                            problems.append(f"byte at gpa {b.region.gpa + off:#x} changed")
                            if len(problems) > 8:
                                return problems
        return problems
        return problems

    def close(self) -> None:
        self.guest.close()
        super().close()


class GuestAlias(MappedMemory):
    """The guest's own view of the same bytes: not audited, every region writable (the guest
    may build rings in its ROM image), and every range it writes is marked `dirty` so the
    check of the devices' writes can tell the two apart. `clean()` starts a new step."""

    def __init__(self, guarded: GuardedMemory) -> None:
        super().__init__()
        for b in guarded.backings:
            self.add_buffer(b.region.gpa,
                            memoryview(b.raw)[GUARD_SIZE:GUARD_SIZE + b.region.size], True)
        self.dirty = {b.region.gpa: bytearray(b.region.size) for b in guarded.backings}
        self._spans = [(b.region.gpa, b.region.end) for b in guarded.backings]
        self._touched: set[int] = set()

    def clean(self) -> None:
        for gpa in self._touched:
            self.dirty[gpa] = bytearray(len(self.dirty[gpa]))
        self._touched.clear()

    def _mark(self, gpa: int, length: int) -> None:
        for start, end in self._spans:
            lo, hi = max(gpa, start), min(gpa + length, end)
            if lo < hi:
                self.dirty[start][lo - start:hi - start] = b"\x01" * (hi - lo)
                self._touched.add(start)

    def locate(self, gpa: int, length: int, writable: bool = False) -> tuple[memoryview, int]:
        out = super().locate(gpa, length, writable)
        if writable:
            self._mark(gpa, length)
        return out

    def views(self, gpa: int, length: int, writable: bool = False) -> list[memoryview]:
        out = super().views(gpa, length, writable)
        if writable:
            self._mark(gpa, length)
        return out


# A descriptor as the guest writes it (VIRTIO 1.2, 2.7.5): addr, len, flags, next; its own
# constants, not the device's, so a mistake in the device's layout is not shared.
_DESC = struct.Struct("<QIHH")
DESC_SIZE = 16
VIRTQ_DESC_F_INDIRECT = 4


class WalkMeter:
    """Counts descriptors read by each chain walk (patches the split ring's descriptor codec)."""

    def __init__(self) -> None:
        self.reads = 0
        self.indirect_entries = 0  # entries of the indirect table met in the current walk

    def unpack_from(self, buf: Any, offset: int = 0) -> tuple[int, int, int, int]:
        self.reads += 1
        desc: tuple[int, int, int, int] = _DESC.unpack_from(buf, offset)
        if desc[2] & VIRTQ_DESC_F_INDIRECT:
            self.indirect_entries = max(self.indirect_entries, desc[1] // DESC_SIZE)
        return desc

    @property
    def size(self) -> int:
        return _DESC.size

    def start(self) -> None:
        self.reads = 0
        self.indirect_entries = 0

    @contextmanager
    def installed(self) -> Iterator[WalkMeter]:
        saved = split_module.DESC
        split_module.DESC = self  # type: ignore[assignment]
        try:
            yield self
        finally:
            split_module.DESC = saved


class RecordingLine:
    """An InterruptLine that remembers what the window did with it."""

    def __init__(self, irq: int) -> None:
        self.irq = irq
        self.raised = 0
        self.lowered = 0
        self.level = False

    def raise_(self) -> None:
        self.raised += 1
        self.level = True

    def lower(self) -> None:
        self.lowered += 1
        self.level = False


@dataclass
class EventLog:
    """A structlog processor keeping every event (and dropping it: nothing is printed)."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        event_dict["level"] = method
        self.events.append(dict(event_dict))
        raise structlog.DropEvent

    def logger(self, **context: Any) -> Any:
        return structlog.wrap_logger(structlog.testing.CapturingLogger(), processors=[self],
                                     wrapper_class=structlog.BoundLogger, context_class=dict,
                                     **context)

    def since(self, mark: int, event: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events[mark:] if event is None or e.get("event") == event]


class BusVmm:
    """What vmmiod.sim.virtio_mmio.VirtioMmioDriver needs of a VMM, straight onto a bus."""

    def __init__(self, bus: Any, memory: MappedMemory, alloc: Any) -> None:
        self.bus = bus
        self.memory = memory
        self.alloc = alloc

    def read(self, addr: int, size: int = 4, vcpu: int = 0) -> int:
        value: int = self.bus.access(addr, size, False)
        return value

    def write(self, addr: int, value: int, size: int = 4, vcpu: int = 0) -> None:
        self.bus.access(addr, size, True, value)


class HeldCompletions:
    """Completions delayed by moves: calls to `obj.<method>` are parked (each with probability
    `hold`, from a seeded generator: the same run holds the same calls) until `release()`.

    For block, `obj` is the device's I/O engine and `method` its `_handler`: finished ops come
    back on the loop through it, so a parked call is a batch of completions that is late by as
    many moves as it stays (even past a reset that cancelled its ops: the device's queue
    generations must then drop it).
    """

    def __init__(self, obj: Any, method: str, seed: int, *, hold: float = 0.75) -> None:
        self.obj = obj
        self.method = method
        self.orig = getattr(obj, method)
        self.rng = random.Random(seed)
        self.hold = hold
        self.held: list[tuple[Any, ...]] = []
        self.parked = 0  # calls ever held
        self.delivered = 0  # held calls released later
        self.forced = 0  # the next calls to hold whatever the draw
        self.paused = False  # every call passes (a liveness check needs its answer)
        setattr(obj, method, self._call)

    def hold_next(self, n: int = 1) -> None:
        self.forced = n

    def _call(self, *args: Any) -> Any:
        if self.paused:
            return self.orig(*args)
        if self.forced:
            self.forced -= 1
        elif self.rng.random() >= self.hold:
            return self.orig(*args)
        self.held.append(args)
        self.parked += 1
        return None

    def release(self, n: int, pick: int = 0) -> int:
        """Deliver up to `n` parked calls, the first from position `pick` (out of order)."""
        done = 0
        while self.held and done < n:
            args = self.held.pop(pick % len(self.held))
            self.orig(*args)
            done += 1
            self.delivered += 1
        return done

    def drop(self) -> None:
        """Forget every parked call (the stack is torn down)."""
        self.held.clear()


class StalledWrites:
    """Console port backends that take nothing while stalled (a client that stops reading)."""

    def __init__(self, ports: list[Any]) -> None:
        self.ports = ports
        self.stalled = False
        self.refused = 0  # writes refused while stalled
        for port in ports:
            orig = port.backend.write

            def write(data: Any, orig: Any = orig) -> int:
                if self.stalled:
                    self.refused += 1
                    return 0
                n: int = orig(data)
                return n
            port.backend.write = write

    def set(self, stalled: bool) -> None:
        was, self.stalled = self.stalled, stalled
        if was and not stalled:
            for port in self.ports:
                port.backend_writable()  # what the backend's writable watch would call

