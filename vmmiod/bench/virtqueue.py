"""Virtqueue benchmark: device-side chains popped and completed per second.

Shapes: a 1-descriptor chain, a 3-descriptor block-like chain (16-byte header, 4 KiB data,
1-byte status) and a 16-entry indirect chain, each with EVENT_IDX on and off. The driver model
fills the ring outside the timed part; the timed part is exactly what a device does per chain:
pop (walk and check), resolve the buffers' memoryviews, add_used, then publish_used per batch.

Run: `python -m vmmiod.bench.virtqueue [--quick]`.
"""

from __future__ import annotations

import time
from typing import Any

from vmmiod.bench.options import quick_option
from vmmiod.memory import MappedMemory
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.virtqueue import SplitQueue

BASE = 0x4000_0000
QUEUE_SIZE = 256


def _rig(event_idx: bool) -> tuple[MappedMemory, Allocator, DriverQueue, SplitQueue]:
    mem = MappedMemory()
    mem.add_buffer(BASE, bytearray(16 << 20))
    alloc = Allocator(BASE, 16 << 20)
    drv = DriverQueue(mem, alloc, QUEUE_SIZE, event_idx=event_idx, indirect=True)
    q = SplitQueue(QUEUE_SIZE)
    q.desc_addr, q.avail_addr, q.used_addr = drv.desc_addr, drv.avail_addr, drv.used_addr
    q.activate(mem, event_idx=event_idx, indirect=True)
    return mem, alloc, drv, q


def _shape(alloc: Allocator, shape: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]], bool]:
    if shape == "1-desc":
        return [(alloc.alloc(64), 64)], [], False
    if shape == "3-desc":
        return [(alloc.alloc(16), 16)], [(alloc.alloc(4096, 4096), 4096), (alloc.alloc(1), 1)], False
    bufs = [(alloc.alloc(256), 256) for _ in range(15)]
    return bufs, [(alloc.alloc(256), 256)], True


def measure(shape: str, event_idx: bool, chains: int) -> dict[str, float]:
    _, alloc, drv, q = _rig(event_idx)
    out, in_, indirect = _shape(alloc, shape)
    # A batch fills the ring: an indirect chain takes one descriptor, a direct one all of its own.
    batch = QUEUE_SIZE if indirect else QUEUE_SIZE // (len(out) + len(in_))
    done = 0
    device_s = 0.0
    interrupts = 0
    clock = time.perf_counter
    while done < chains:
        n = min(batch, chains - done)
        for _ in range(n):
            drv.add(out, in_, indirect=indirect)
        drv.kick_prepare()
        t0 = clock()
        q.disable_notification()
        while True:
            chain = q.pop()
            if chain is None:
                if not q.enable_notification():
                    break
                continue
            chain.readable_views()
            wv = chain.writable_views()
            q.add_used(chain.head, sum(len(v) for v in wv))
        if q.publish_used():
            interrupts += 1
        device_s += clock() - t0
        drv.drain_used()
        done += n
    return {
        "chains_per_s": chains / device_s,
        "us_per_chain": device_s / chains * 1e6,
        "interrupts": interrupts,
    }


def run(quick: bool = False) -> dict[str, Any]:
    chains = 20_000 if quick else 200_000
    results: dict[str, Any] = {}
    for shape in ("1-desc", "3-desc", "indirect-16"):
        for event_idx in (False, True):
            key = f"{shape} event_idx={'on' if event_idx else 'off'}"
            results[key] = measure(shape, event_idx, chains)
    return results


def main(argv: list[str] | None = None) -> int:
    results = run(quick=quick_option("virtqueue", "Split-virtqueue figures: chains popped and completed per second, per chain shape.", argv))
    print(f"{'virtqueue shape':34} {'chains/s':>12} {'us/chain':>10}")
    for key, r in results.items():
        print(f"{key:34} {r['chains_per_s']:12,.0f} {r['us_per_chain']:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
