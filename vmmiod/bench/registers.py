"""Register benchmark: guest register accesses per second, layer by layer.

Two accesses that dominate a running guest: a QueueNotify write (every kick) and a 4-byte
config read. Each is measured three ways in one process, so the ratios show what each layer
costs:
- `window`: VirtioMmio.write/read called directly (the register state machine alone);
- `bus`: MmioBus.access (window lookup, size mask, exception guard) + window;
- `slot`: a ready ioreq_t in a page (mmap, as the Xen/generic adaptors map it) served by
  serve_ioreq_slot (state checks, barriers, unpack, bus, window, data and state stores), which
  builds a slot server and calls it once: what a restart's pass over the slots costs. The loop
  re-arms the slot's state byte each time, as the hypervisor would.
- `slot server`: the same through one `slot_server` built beforehand (what both adaptors call
  per IOREQ: one per vCPU, offsets and the bus bound once).
The notify reaches a real device with an enabled, empty queue (the device's queue_notify and an
empty pop run inside the measurement, there being no event loop to defer them to).

Then `eventfd loop`: InterruptStatus reads as the generic channel carries them, on an event
loop (uvloop when importable) in this one process: a reader on the request eventfd does what
the adaptor's does (read it, serve the slot, write the response eventfd) and a second reader
plays the VMM (read the response, re-arm the slot, kick). The figure is CPU per IOREQ for both
sides together: two loop turns, four eventfd system calls, no other process to wake (what a
VMM in another process adds is in `python -m vmmiod.bench.channel`).

Run: `python -m vmmiod.bench.registers [--quick]`.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
from collections.abc import Callable
from typing import Any

import structlog

from vmmiod.bench.options import quick_option
from vmmiod.bus import MmioBus
from vmmiod.devices.base import VirtioDevice
from vmmiod.hypervisors.ioreq_slot import serve_ioreq_slot, slot_server
from vmmiod.ioreq import (
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_WRITE,
    STATE_IOREQ_READY,
    XenIoreq,
    decode_ioreq,
    pack_ioreq_into,
)
from vmmiod.memory import MappedMemory
from vmmiod.mmio import VirtioMmio
from vmmiod.mmio_regs import (
    ACKNOWLEDGE,
    CONFIG,
    DRIVER,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    DRIVER_OK,
    FEATURES_OK,
    INTERRUPT_STATUS,
    QUEUE_DESC_LOW,
    QUEUE_DEVICE_LOW,
    QUEUE_DRIVER_LOW,
    QUEUE_NOTIFY,
    QUEUE_NUM,
    QUEUE_READY,
    QUEUE_SEL,
    STATUS,
    WINDOW_SIZE,
)
from vmmiod.sim.vring import Allocator, DriverQueue

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 20
WINDOW_BASE = 0x0200_0000
QUEUE_SIZE = 256
SLOT_FLAGS = 30
CONFIG_SPACE = bytes(range(64))


class BenchDevice(VirtioDevice):
    """A device whose queue work is one (empty) pop: the register path is what is measured."""

    device_id = 42
    type_name = "bench"

    def config_bytes(self) -> bytes:
        return CONFIG_SPACE  # prebuilt: the device's cost of building it is not the window's

    def process_queue(self, index: int) -> None:
        q = self.queues[index]
        while q.pop() is not None:  # the driver adds nothing: one avail.idx read
            pass


class NullLine:
    def raise_(self) -> None:
        pass

    def lower(self) -> None:
        pass


def _probe(window: VirtioMmio, memory: MappedMemory) -> None:
    """The Linux v2 sequence, short form: one queue enabled, DRIVER_OK."""
    w = window.write
    w(STATUS, 4, ACKNOWLEDGE)
    w(STATUS, 4, ACKNOWLEDGE | DRIVER)
    w(DRIVER_FEATURES_SEL, 4, 1)
    w(DRIVER_FEATURES, 4, 1)  # VERSION_1
    w(STATUS, 4, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    dq = DriverQueue(memory, Allocator(RAM_BASE, RAM_SIZE), QUEUE_SIZE)
    w(QUEUE_SEL, 4, 0)
    w(QUEUE_NUM, 4, QUEUE_SIZE)
    for off, addr in ((QUEUE_DESC_LOW, dq.desc_addr), (QUEUE_DRIVER_LOW, dq.avail_addr),
                      (QUEUE_DEVICE_LOW, dq.used_addr)):
        w(off, 4, addr & 0xFFFF_FFFF)
        w(off + 4, 4, addr >> 32)
    w(QUEUE_READY, 4, 1)
    w(STATUS, 4, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    if not window.device.active:
        raise RuntimeError("benchmark device did not come up")


def _setup() -> tuple[VirtioMmio, MmioBus, BenchDevice]:
    memory = MappedMemory()
    memory.add_buffer(RAM_BASE, bytearray(RAM_SIZE))
    quiet = structlog.wrap_logger(structlog.ReturnLogger())  # the figures are the output
    device = BenchDevice("bench0", (QUEUE_SIZE,), log=quiet)
    window = VirtioMmio(device, NullLine(), log=quiet)
    bus = MmioBus()
    bus.register(WINDOW_BASE, WINDOW_SIZE, window)
    bus.attach_memory(memory)
    _probe(window, memory)
    return window, bus, device


def _rate(fn: Callable[[int], None], n: int) -> dict[str, float]:
    fn(min(n, 1000))  # warm up
    t0 = time.perf_counter()
    fn(n)
    dt = time.perf_counter() - t0
    return {"accesses_per_s": n / dt, "ns_per_access": dt / n * 1e9}


def run(quick: bool = False) -> dict[str, Any]:
    return measure(50_000 if quick else 500_000)


def measure(n: int) -> dict[str, Any]:
    """Every figure, with `n` timed accesses per path (after a warm-up of up to 1000)."""
    window, bus, device = _setup()
    page = mmap.mmap(-1, 4096)
    results: dict[str, Any] = {}
    try:
        for name, offset, is_write in (("notify", QUEUE_NOTIFY, True), ("config", CONFIG, False)):
            addr = WINDOW_BASE + offset

            def window_loop(k: int, offset: int = offset, is_write: bool = is_write) -> None:
                if is_write:
                    for _ in range(k):
                        window.write(offset, 4, 0)
                else:
                    for _ in range(k):
                        window.read(offset, 4)

            def bus_loop(k: int, addr: int = addr, is_write: bool = is_write) -> None:
                access = bus.access
                for _ in range(k):
                    access(addr, 4, is_write, 0)

            pack_ioreq_into(page, 0, XenIoreq(addr, 0, 1, 4, 7, STATE_IOREQ_READY, False,
                                              IOREQ_WRITE if is_write else IOREQ_READ, False,
                                              IOREQ_TYPE_COPY))
            armed = page[SLOT_FLAGS]

            def slot_loop(k: int, armed: int = armed) -> None:
                for _ in range(k):
                    page[SLOT_FLAGS] = armed  # the hypervisor's part: a new request is READY
                    serve_ioreq_slot(page, 0, bus)

            server = slot_server(page, 0, bus)

            def server_loop(k: int, armed: int = armed,
                            server: Callable[[], bool] = server) -> None:
                for _ in range(k):
                    page[SLOT_FLAGS] = armed
                    server()

            r_window = _rate(window_loop, n)
            r_bus = _rate(bus_loop, n)
            r_slot = _rate(slot_loop, n)
            results[f"{name} window"] = r_window
            results[f"{name} bus"] = r_bus
            results[f"{name} slot"] = r_slot
            results[f"{name} slot server"] = _rate(server_loop, n)
            results[f"{name} slot/window time ratio"] = (
                r_slot["ns_per_access"] / r_window["ns_per_access"])

        def decode_loop(k: int) -> None:
            for _ in range(k):
                decode_ioreq(page, 0)

        results["ioreq_t decode to XenIoreq (not on the hot path)"] = _rate(decode_loop, n)
        results["InterruptStatus eventfd loop (both sides, CPU)"] = eventfd_loop(
            page, bus, max(1000, n // 5))
        results["notifications seen by device"] = device.counters["notifications"]
        if bus.unhandled:  # every access above must have reached the window
            raise RuntimeError(f"benchmark accesses went unhandled: {bus.unhandled}")
    finally:
        page.close()
    return results


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # the daemon falls back to asyncio too
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def eventfd_loop(page: mmap.mmap, bus: MmioBus, n: int) -> dict[str, float]:
    """`n` InterruptStatus reads through eventfds on one event loop (module docstring)."""
    pack_ioreq_into(page, 0, XenIoreq(WINDOW_BASE + INTERRUPT_STATUS, 0, 1, 4, 7,
                                      STATE_IOREQ_READY, False, IOREQ_READ, False,
                                      IOREQ_TYPE_COPY))
    armed, one = page[SLOT_FLAGS], (1).to_bytes(8, "little")
    req, resp = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    loop = _new_loop()
    try:
        serve = slot_server(page, 0, bus)
        left = [n]
        done = loop.create_future()

        def daemon_side() -> None:  # the generic adaptor's reader, short of its counters
            os.read(req, 8)
            if serve():
                os.write(resp, one)
            elif not done.done():  # cannot happen: the slot was armed before every kick
                done.set_exception(RuntimeError("the armed slot was not served"))

        def vmm_side() -> None:
            os.read(resp, 8)
            left[0] -= 1
            if left[0] <= 0:
                done.set_result(None)
                return
            page[SLOT_FLAGS] = armed
            os.write(req, one)

        loop.add_reader(req, daemon_side)
        loop.add_reader(resp, vmm_side)
        page[SLOT_FLAGS] = armed
        os.write(req, one)
        c0 = time.process_time()
        loop.run_until_complete(done)
        cpu = time.process_time() - c0
        loop.remove_reader(req)
        loop.remove_reader(resp)
    finally:
        loop.close()
        os.close(req)
        os.close(resp)
    return {"accesses_per_s": n / cpu, "ns_per_access": cpu / n * 1e9}


def main(argv: list[str] | None = None) -> int:
    results = run(quick=quick_option("registers", "Register access figures: virtio-mmio register reads and writes per second, per path.", argv))
    print(f"{'register access path':48} {'accesses/s':>12} {'ns/access':>10}")
    for key, r in results.items():
        if isinstance(r, dict):
            print(f"{key:48} {r['accesses_per_s']:12,.0f} {r['ns_per_access']:10.0f}")
        elif isinstance(r, float):
            print(f"{key:48} {r:12.2f}")
        else:
            print(f"{key:48} {r:12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
