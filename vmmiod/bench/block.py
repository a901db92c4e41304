"""virtio-blk benchmark (`vmmiod bench block`): figures from one run, as ratios.

1. Real storage (vmmiod/bench/block_disk.py): O_DIRECT on a file in VMMIOD_BENCH_DIR, 4 KiB
   random read/write at queue depth 1, 8, 32, 128 and 1 MiB sequential, vmmiod (io_uring and
   the thread-pool engine) next to fio with the same job and a plain Python loop.
2. Page cache (here): 4 KiB random and 1 MiB sequential reads and writes at queue depth 1 and
   32 over a warm image. The device runs in-process without a loop (the engine's kick waits for
   the completions); the guest-side driver model fills the ring outside the timed part; the
   timed part is what the daemon does per notification: pop, parse, submit, the engine's
   system call(s), completion, status, used ring, interrupt decision. The plain loop does the
   same I/O with os.preadv/os.pwritev and nothing else. CPU is time.process_time (every thread
   of the process: engine threads included); IOPS and MB/s use wall time.
3. Loop stall (vmmiod/bench/block_stall.py): a register read of another device while one disk
   is saturated.
4. The full stack (vmmiod/bench/block_stack.py): `vmmiod run` as a child process and the
   simulated guest over the generic IOREQ channel, page-cache-warm.
5. The full stack on real storage (vmmiod/bench/block_stack_disk.py): the same daemon with
   `cache: none` on the real-storage image, the guest a closed loop in its own process, rounds
   alternated with fio on the same file.

Run: `python -m vmmiod.bench.block [--quick] [--profile] [--no-stack]`. docs/performance.md has
the figures and what they mean.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmmiod.bench.block_workloads import KIB4, MIB1, QUEUE_SIZE, WORKLOADS, _offsets
from vmmiod.config import BlockConfig, GuestConfig, MmioConfig
from vmmiod.devices.block import BlockDevice
from vmmiod.devices.block_request import (
    REQ_HEADER,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from vmmiod.memory import memfd_memory
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.virtqueue import SplitQueue

GPA = 0x4000_0000
ROUNDS = 3  # plain and device alternate; each side keeps its best round (the host is shared)


class _Transport:
    def __init__(self) -> None:
        self.interrupts = 0

    def signal_used(self, queue_index: int) -> None:
        self.interrupts += 1

    def signal_config_change(self) -> None:
        pass

    def device_fault(self, reason: str) -> None:
        raise RuntimeError(f"device fault in benchmark: {reason}")


class Rig:
    """One BlockDevice on `image`, driven by the driver model in a memfd guest."""

    def __init__(self, image: Path, depth: int, block: int, cache: str = "writeback",
                 engine: str = "auto") -> None:
        cfg = BlockConfig(id="bench", mmio=MmioConfig(base=0x1000_0000, irq=5), path=image,
                          cache=cache, queue_size=QUEUE_SIZE, lock=False,  # type: ignore[arg-type]
                          io_engine=engine)  # type: ignore[arg-type]
        self.dev = BlockDevice(cfg, GuestConfig("bench"), log=_NullLog())
        asyncio.run(self.dev.open())
        mem_size = depth * block + (8 << 20)
        self.mem, self.memfd = memfd_memory(mem_size, GPA)
        alloc = Allocator(GPA, mem_size)
        self.drv = DriverQueue(self.mem, alloc, QUEUE_SIZE, event_idx=True, indirect=True)
        q = SplitQueue(QUEUE_SIZE)
        q.desc_addr, q.avail_addr, q.used_addr = (self.drv.desc_addr, self.drv.avail_addr,
                                                  self.drv.used_addr)
        q.activate(self.mem, event_idx=True, indirect=True)
        self.transport = _Transport()
        self.dev.activate(self.mem, [q], self.dev.device_features(), self.transport)
        # One slot per queue-depth entry: header, page-aligned data buffer, status byte.
        self.slots = [(alloc.alloc(16, 16), alloc.alloc(block, 4096), alloc.alloc(1, 1))
                      for _ in range(depth)]
        self.block = block
        self.profile: cProfile.Profile | None = None
        for _, data, _ in self.slots:
            self.mem.write(data, os.urandom(block))

    def batch(self, rtype: int, offsets: list[int]) -> tuple[float, float]:
        """Submit len(offsets) requests, notify once; returns the device's (cpu, wall) seconds."""
        mem, drv, block = self.mem, self.drv, self.block
        for (hdr, data, st), off in zip(self.slots, offsets):
            buf, o = mem.locate(hdr, 16, True)
            REQ_HEADER.pack_into(buf, o, rtype, 0, off >> 9)
            if rtype == VIRTIO_BLK_T_IN:
                drv.add([(hdr, 16)], [(data, block), (st, 1)])
            else:
                drv.add([(hdr, 16), (data, block)], [(st, 1)])
        drv.kick_prepare()
        prof = self.profile
        c0, w0 = time.process_time(), time.perf_counter()
        if prof is None:
            self.dev.queue_notify(0)
        else:  # the profile covers the device's work only, not the driver model's
            prof.enable()
            self.dev.queue_notify(0)
            prof.disable()
        c1, w1 = time.process_time(), time.perf_counter()
        used = drv.drain_used()
        if len(used) != len(offsets):
            raise RuntimeError(f"{len(used)} of {len(offsets)} requests completed")
        if any(mem.read(st, 1)[0] != VIRTIO_BLK_S_OK for _, _, st in self.slots[:len(offsets)]):
            raise RuntimeError("a benchmark request failed")
        return c1 - c0, w1 - w0

    def close(self) -> None:
        self.dev.reset()
        asyncio.run(self.dev.close())
        self.mem.close()
        os.close(self.memfd)


class _NullLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: self

    def bind(self, **kw: Any) -> _NullLog:
        return self


class Plain:
    """The baseline: os.preadv/os.pwritev, `depth` buffers per batch, nothing else.

    The buffers are memfd-backed shared pages like the guest RAM of the generic channel (the
    kernel copies into shmem pages measurably slower than into private anonymous ones).
    """

    def __init__(self, image: Path, write: bool, block: int, depth: int) -> None:
        self.fd = os.open(image, os.O_RDWR)
        self.mem, self.memfd = memfd_memory(depth * block, GPA, "vmmiod-bench-plain")
        self.whole = self.mem.views(GPA, depth * block, True)[0]
        self.views = [self.whole[i * block:(i + 1) * block] for i in range(depth)]
        for v in self.views:
            v[:] = os.urandom(block)
        self.op = os.pwritev if write else os.preadv
        self.block = block

    def batch(self, offsets: list[int]) -> tuple[float, float]:
        op, fd, block = self.op, self.fd, self.block
        c0, w0 = time.process_time(), time.perf_counter()
        for buf, off in zip(self.views, offsets):
            if op(fd, [buf], off) != block:
                raise RuntimeError("short transfer in the plain loop")
        return time.process_time() - c0, time.perf_counter() - w0

    def close(self) -> None:
        for v in self.views:
            v.release()
        self.whole.release()
        self.mem.close()
        os.close(self.memfd)
        os.close(self.fd)


def measure(image: Path, size: int, name: str, rtype: int, block: int, rand: bool, depth: int,
            count: int, profile: bool = False, engine: str = "auto") -> dict[str, Any]:
    """Plain loop and device interleaved slice by slice, ROUNDS times; per slice the best round.

    The host is shared: interleaving puts both sides under the same conditions, and the best
    round of each slice drops the moments when something else had the CPU.
    """
    offsets = _offsets(size, block, count, rand)
    write = rtype == VIRTIO_BLK_T_OUT
    plain = Plain(image, write, block, depth)
    rig = Rig(image, depth, block, engine=engine)
    per_slice = max(depth, (64 if block == KIB4 else 4) // depth * depth)
    slices = [offsets[i:i + per_slice] for i in range(0, count, per_slice)]
    best = [[float("inf")] * 4 for _ in slices]  # plain cpu, plain wall, dev cpu, dev wall
    prof = cProfile.Profile() if profile else None
    try:
        for rnd in range(ROUNDS):
            for k, sl in enumerate(slices):
                pc = pw = dc = dw = 0.0
                for i in range(0, len(sl), depth):
                    c, w = plain.batch(sl[i:i + depth])
                    pc, pw = pc + c, pw + w
                rig.profile = prof if rnd == ROUNDS - 1 else None
                for i in range(0, len(sl), depth):
                    c, w = rig.batch(rtype, sl[i:i + depth])
                    dc, dw = dc + c, dw + w
                b = best[k]
                best[k] = [min(b[0], pc), min(b[1], pw), min(b[2], dc), min(b[3], dw)]
    finally:
        rig.close()
        plain.close()
    pc, pw, dc, dw = (sum(b[j] for b in best) for j in range(4))
    r: dict[str, Any] = {
        "iops": count / dw, "mb_s": count * block / dw / 1e6, "cpu_us": dc / count * 1e6,
        "plain_iops": count / pw, "plain_mb_s": count * block / pw / 1e6,
        "plain_cpu_us": pc / count * 1e6,
    }
    r["cpu_ratio"] = r["cpu_us"] / r["plain_cpu_us"]
    r["throughput_ratio"] = r["mb_s"] / r["plain_mb_s"]
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        r["profile"] = s.getvalue()
    return r


ENGINES = ("io_uring", "threads")


def run(quick: bool = False, profile: bool = False, stack: bool = True) -> dict[str, Any]:
    from vmmiod.bench import block_disk, block_stall
    size = (64 if quick else 256) << 20
    base = Path(os.environ.get("VMMIOD_BENCH_DIR", tempfile.gettempdir()))
    # The host may be shared: the load says how much of the CPU the figures had.
    results: dict[str, Any] = {"started": time.strftime("%H:%M:%S UTC", time.gmtime()),
                               "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(dir=base, prefix="vmmiod-bench-blk-") as d:
        results["disk"] = block_disk.run(Path(d), quick, ENGINES)
        disk_image = block_disk.make_image(Path(d), (256 if quick else 1024) << 20)
        results["stall"] = block_stall.run(disk_image, (*ENGINES, "sync"),
                                           1.0 if quick else 3.0)
        if stack:
            from vmmiod.bench import block_stack_disk
            stack_disk = Path(d) / "stack-disk"
            stack_disk.mkdir()
            results["full_stack_disk"] = block_stack_disk.run(disk_image, stack_disk, quick)
        disk_image.unlink()
        image = Path(d) / "bench.img"
        with open(image, "wb") as f:  # allocated, non-zero, page-cache warm
            chunk = os.urandom(MIB1)
            f.writelines(chunk for _ in range(size // MIB1))
        page: dict[str, Any] = {}
        for name, rtype, block, rand in WORKLOADS:
            for depth in (1, 32):
                count = (4000 if quick else 20000) if block == KIB4 else (256 if quick else 1024)
                count -= count % depth
                page[f"{name} qd{depth}"] = measure(image, size, name, rtype, block, rand,
                                                    depth, count, profile)
        for engine in (*ENGINES[1:], "sync"):  # the other engines on the headline workload
            count = 4000 if quick else 20000
            page[f"rand-read-4k qd32 {engine}"] = measure(
                image, size, "rand-read-4k", VIRTIO_BLK_T_IN, KIB4, True, 32, count, profile,
                engine)
        results["page_cache"] = page
        if stack:
            from vmmiod.bench.block_stack import full_stack
            stack_dir = Path(d) / "stack"
            stack_dir.mkdir()
            results["full_stack"] = full_stack(image, stack_dir, quick, page)
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main(argv: list[str] | None = None) -> int:
    from vmmiod.bench import block_disk, block_stall
    ap = argparse.ArgumentParser(
        prog="python -m vmmiod.bench.block",
        description="virtio-blk figures in one run: real storage next to fio and the plain loop, "
                    "the loop stall, the page cache, the full stack (docs/performance.md). "
                    "The image goes in VMMIOD_BENCH_DIR (default: the temp dir). Figures only.")
    ap.add_argument("--quick", action="store_true", help="short runs (figures are rougher)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the device side of the page-cache jobs (cProfile)")
    ap.add_argument("--no-stack", action="store_true",
                    help="leave out the full-stack sections (`vmmiod run` in a child process)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    results = run(quick=args.quick, profile=args.profile, stack=not args.no_stack)
    load0, load1 = results["load_average_start"], results["load_average_end"]
    print(f"run from {results['started']}, load average (1/5/15 min) at start "
          f"{'/'.join(f'{x:.2f}' for x in load0)}, at end {'/'.join(f'{x:.2f}' for x in load1)}")
    print("\n".join(block_disk.report(results["disk"], ENGINES)))
    print()
    print("\n".join(block_stall.report(results["stall"])))
    if "full_stack_disk" in results:
        from vmmiod.bench import block_stack_disk
        print()
        print("\n".join(block_stack_disk.report(results["full_stack_disk"])))
    print("\npage cache (warm image; default engine unless named)")
    print(f"{'virtio-blk workload':26} {'IOPS':>9} {'MB/s':>8} {'cpu us':>8} | "
          f"{'plain IOPS':>10} {'MB/s':>8} {'cpu us':>8} | {'cpu x':>6} {'tput %':>7}")
    for key, r in results["page_cache"].items():
        print(f"{key:26} {r['iops']:9,.0f} {r['mb_s']:8,.0f} {r['cpu_us']:8.2f} | "
              f"{r['plain_iops']:10,.0f} {r['plain_mb_s']:8,.0f} {r['plain_cpu_us']:8.2f} | "
              f"{r['cpu_ratio']:6.2f} {r['throughput_ratio'] * 100:6.1f}%")
    if "full_stack" in results:
        print("\nfull stack: `vmmiod run` child + simulated guest over the generic IOREQ channel")
        print(f"{'virtio-blk workload':22} {'IOPS':>9} {'MB/s':>8} {'daemon cpu us':>14} | "
              f"{'cpu x plain':>11} {'tput %':>7}")
        for key, r in results["full_stack"].items():
            print(f"{key:22} {r['iops']:9,.0f} {r['mb_s']:8,.0f} {r['daemon_cpu_us']:14.2f} | "
                  f"{r.get('cpu_ratio', 0):11.2f} {r.get('throughput_ratio', 0) * 100:6.1f}%")
    for key, r in results["page_cache"].items():
        if "profile" in r:
            print(f"\n--- profile: {key} (device side) ---\n{r['profile']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
