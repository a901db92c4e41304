"""Shared set-up for virtqueue tests: guest memory, the driver model and the device queue."""

from __future__ import annotations

from dataclasses import dataclass

from vmmiod.memory import MappedMemory
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.virtqueue import SplitQueue

BASE = 0x4000_0000
GUARD = 0x1000  # bytes of host buffer on each side of guest RAM that must never change


@dataclass
class Rig:
    memory: MappedMemory
    backing: bytearray  # guard + RAM + guard
    alloc: Allocator
    driver: DriverQueue
    queue: SplitQueue

    def guards_intact(self) -> bool:
        return (self.backing[:GUARD] == b"\xa5" * GUARD
                and self.backing[-GUARD:] == b"\xa5" * GUARD)


def make_rig(size: int = 16, *, event_idx: bool = False, indirect: bool = False,
             ram: int = 0x40000, start_index: int | None = None, activate: bool = True,
             queue_class: type[SplitQueue] = SplitQueue) -> Rig:
    backing = bytearray(b"\xa5" * (ram + 2 * GUARD))
    memory = MappedMemory()
    # Only the middle of the host buffer is guest RAM: writes outside it would hit the guards.
    memory.add_buffer(BASE, memoryview(backing)[GUARD:GUARD + ram])
    memory.write(BASE, bytes(ram))
    alloc = Allocator(BASE, ram)
    driver = DriverQueue(memory, alloc, size, event_idx=event_idx, indirect=indirect)
    if start_index is not None:
        driver.set_start_index(start_index)
    queue = queue_class(max(size, 256))
    queue.size = size
    queue.desc_addr, queue.avail_addr, queue.used_addr = (
        driver.desc_addr, driver.avail_addr, driver.used_addr)
    if activate:
        queue.activate(memory, event_idx=event_idx, indirect=indirect)
        if start_index is not None:
            queue.set_indices(start_index, start_index)
    return Rig(memory, backing, alloc, driver, queue)


def buffer(rig: Rig, data: bytes | int) -> tuple[int, int]:
    """Allocate a guest buffer: filled with `data`, or `data` zero bytes."""
    n = data if isinstance(data, int) else len(data)
    gpa = rig.alloc.alloc(n, 8)
    if not isinstance(data, int):
        rig.memory.write(gpa, data)
    return gpa, n
