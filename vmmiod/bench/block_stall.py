"""Loop stall: how long a register read of another device waits while one disk is saturated.

One event loop holds two devices, as one daemon does: a BlockDevice kept at queue depth 32 of
4 KiB O_DIRECT random reads by the closed-loop guest of block_disk.py, and the virtio-mmio
register window of a second device. A prober thread plays the vCPU: every millisecond it
posts a register read (an eventfd the loop watches, as the generic channel's ioreq eventfd is)
and the loop answers it by reading MagicValue through the window. The time from the post to
the answer is what a vCPU of the guest would wait. The same probe with the disk idle shows
what the machine itself adds (its run queue: the host is shared). "cold writeback" runs the
same load with `cache: writeback` after dropping the image from the page cache, so the reads
are buffered and miss the cache: they must not block the loop either.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

from vmmiod.bench.block_disk import ClosedLoop, NullLog, new_loop
from vmmiod.config import BlockConfig, GuestConfig, MmioConfig
from vmmiod.devices.block import BlockDevice
from vmmiod.mmio import VirtioMmio

MAGIC_VALUE = 0x000  # register offset (virtio-mmio), "virt" in little endian


class _Line:
    def raise_(self) -> None:
        pass

    def lower(self) -> None:
        pass


def run_queue_wait_s() -> float:
    """Seconds this process has spent runnable but waiting for a CPU (/proc schedstat)."""
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


async def _probe(image: Path, other: Path, engine: str | None,
                 seconds: float, cache: str = "none") -> dict[str, float]:
    cfg = BlockConfig(id="other", mmio=MmioConfig(base=0x2000_0000, irq=6), path=other,
                      lock=False)
    second = BlockDevice(cfg, GuestConfig("bench"), log=NullLog())
    await second.open()
    window = VirtioMmio(second, _Line())
    load = None
    if engine is not None:
        if cache != "none":  # a cold page cache: every read has to go to the disk
            fd = os.open(image, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        load = ClosedLoop(image, engine, False, 4096, True, 32, cache=cache)
        await load.start()
        load.run()
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    posted = [0.0]
    answered = threading.Event()
    lat: list[float] = []

    def on_ioreq() -> None:
        try:
            os.eventfd_read(efd)
        except BlockingIOError:
            return
        if window.read(MAGIC_VALUE, 4) != 0x74726976:
            raise RuntimeError("register read answered wrongly")
        lat.append(time.perf_counter() - posted[0])
        answered.set()

    stop = threading.Event()

    def vcpu() -> None:
        while not stop.is_set():
            answered.clear()
            posted[0] = time.perf_counter()
            os.eventfd_write(efd, 1)
            answered.wait(5)
            time.sleep(0.001)

    loop = asyncio.get_running_loop()
    loop.add_reader(efd, on_ioreq)
    q0 = run_queue_wait_s()
    t = threading.Thread(target=vcpu, daemon=True)
    t.start()
    await asyncio.sleep(seconds)
    stop.set()
    answered.set()
    await loop.run_in_executor(None, t.join)
    waited = run_queue_wait_s() - q0
    loop.remove_reader(efd)
    os.close(efd)
    done = 0
    if load is not None:
        await load.drain()
        done = load.done
        await load.close()
    await second.close()
    lat.sort()
    n = len(lat)
    return {"probes": n, "p50_us": lat[n // 2] * 1e6, "p99_us": lat[int(n * 0.99)] * 1e6,
            "max_us": lat[-1] * 1e6, "disk_iops": done / seconds,
            "run_queue_wait_pct": waited / seconds * 100}


def run(image: Path, engines: tuple[str, ...], seconds: float) -> dict[str, Any]:
    other = image.parent / "bench-other.img"
    other.write_bytes(bytes(1 << 20))
    out: dict[str, Any] = {}
    try:
        runs = [(None, "none"), *((e, "none") for e in engines),
                *((e, "writeback") for e in engines)]
        for engine, cache in runs:
            loop = new_loop()
            key = "idle" if engine is None else engine if cache == "none" else \
                f"{engine} cold writeback"
            try:
                out[key] = loop.run_until_complete(_probe(image, other, engine, seconds, cache))
            finally:
                loop.close()
    finally:
        other.unlink()
    return out


def report(res: dict[str, Any]) -> list[str]:
    lines = [("loop stall: register read of another device while one disk runs QD32 4 KiB "
              "random reads, O_DIRECT (cold writeback: buffered, page cache dropped first; "
              "idle: no disk load)"),
             (f"{'engine':24} {'probes':>7} {'p50 us':>9} {'p99 us':>9} {'max us':>9} "
             f"{'disk IOPS':>10} {'run-queue wait':>15}")]
    for k, r in res.items():
        lines.append(f"{k:24} {r['probes']:7d} {r['p50_us']:9.0f} {r['p99_us']:9.0f} "
                     f"{r['max_us']:9.0f} {r['disk_iops']:10,.0f} "
                     f"{r['run_queue_wait_pct']:14.0f}%")
    return lines
