"""virtio-blk benchmark: the device next to a plain Python preadv/pwritev loop, in one run.

Workloads: 4 KiB random reads and writes, 1 MiB sequential reads and writes, each at queue
depth 1 and 32, over the same (page-cache warm) image file. The device side runs in-process:
the guest-side driver model (vmmiod/sim/vring.py, indirect descriptors and EVENT_IDX as Linux
uses them) fills the ring outside the timed part; the timed part is exactly what the daemon
does per notification: `queue_notify` -> pop, parse, preadv/pwritev into guest memory, status,
used ring, interrupt decision. The plain loop does the same I/O with os.preadv/os.pwritev on
page-aligned buffers and nothing else. CPU is time.process_time; IOPS and MB/s use wall time.

A second part measures what decided the threading model (docs/architecture.md, virtio-blk):
the per-request cost of handing a 4 KiB read to a worker thread versus doing it inline, and how
long the event loop stalls when an fdatasync runs inline versus on the device's worker thread.

A third part runs the same workloads through the full stack: `vmmiod run` as a child process
and the simulated guest (vmmiod/sim/) over the generic IOREQ channel, with the daemon's CPU per
request read from /proc and compared with the plain loop of this run.

Run: `python -m vmmiod.bench.block [--quick] [--profile]`.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import os
import pstats
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
QUEUE_SIZE = 128
KIB4 = 4096
MIB1 = 1 << 20
ROUNDS = 3  # plain and device alternate; each side keeps its best round (the host is shared)
WORKLOADS = (("rand-read-4k", VIRTIO_BLK_T_IN, KIB4, True),
             ("rand-write-4k", VIRTIO_BLK_T_OUT, KIB4, True),
             ("seq-read-1m", VIRTIO_BLK_T_IN, MIB1, False),
             ("seq-write-1m", VIRTIO_BLK_T_OUT, MIB1, False))


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

    def __init__(self, image: Path, depth: int, block: int, cache: str = "writeback") -> None:
        cfg = BlockConfig(id="bench", mmio=MmioConfig(base=0x1000_0000, irq=5), path=image,
                          cache=cache, queue_size=QUEUE_SIZE, lock=False)  # type: ignore[arg-type]
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


def _offsets(size: int, block: int, count: int, rand: bool, seed: int = 1) -> list[int]:
    slots = size // block
    if rand:
        rng = random.Random(seed)
        return [rng.randrange(slots) * block for _ in range(count)]
    return [(i % slots) * block for i in range(count)]


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
            count: int, profile: bool = False) -> dict[str, Any]:
    """Plain loop and device interleaved slice by slice, ROUNDS times; per slice the best round.

    The host is shared: interleaving puts both sides under the same conditions, and the best
    round of each slice drops the moments when something else had the CPU.
    """
    offsets = _offsets(size, block, count, rand)
    write = rtype == VIRTIO_BLK_T_OUT
    plain = Plain(image, write, block, depth)
    rig = Rig(image, depth, block)
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


# -- what decided the threading model -----------------------------------------------------------
def dispatch(image: Path, size: int, count: int) -> dict[str, float]:
    """Inline preadv vs a worker-thread hand-off; loop stall of fdatasync inline vs on the worker."""
    import mmap
    fd = os.open(image, os.O_RDWR)
    buf = memoryview(mmap.mmap(-1, KIB4))
    offsets = _offsets(size, KIB4, count, True, seed=2)
    out: dict[str, float] = {}
    c0 = time.process_time()
    w0 = time.perf_counter()
    for off in offsets:
        os.preadv(fd, [buf], off)
    out["inline_read_4k_us"] = (time.perf_counter() - w0) / count * 1e6
    out["inline_read_4k_cpu_us"] = (time.process_time() - c0) / count * 1e6

    async def handoff() -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1) as pool:
            c0, w0 = time.process_time(), time.perf_counter()
            for off in offsets:
                await loop.run_in_executor(pool, os.preadv, fd, [buf], off)
            out["worker_read_4k_us"] = (time.perf_counter() - w0) / count * 1e6
            out["worker_read_4k_cpu_us"] = (time.process_time() - c0) / count * 1e6

    async def stall(inline: bool) -> float:
        """Largest gap of a 1 ms heartbeat while 32 MiB of dirty data is flushed."""
        gaps: list[float] = []
        stop = False

        async def beat() -> None:
            loop = asyncio.get_running_loop()
            last = loop.time()
            while not stop:
                await asyncio.sleep(0.001)
                now = loop.time()
                gaps.append(now - last)
                last = now
        junk = os.urandom(MIB1)
        for i in range(32):
            os.pwrite(fd, junk, (i * MIB1) % size)
        hb = asyncio.ensure_future(beat())
        await asyncio.sleep(0.01)
        if inline:
            os.fdatasync(fd)
        else:
            await rig_flush()
        await asyncio.sleep(0.01)
        stop = True
        await hb
        return max(gaps) * 1e3

    async def rig_flush() -> None:
        cfg = BlockConfig(id="bench", mmio=MmioConfig(base=0x1000_0000, irq=5), path=image,
                          lock=False)
        dev = BlockDevice(cfg, GuestConfig("bench"), log=_NullLog())
        await dev.open()
        await asyncio.get_running_loop().run_in_executor(None, dev.backing.flush)
        await dev.close()

    try:
        asyncio.run(handoff())
        out["inline_fdatasync_stall_ms"] = asyncio.run(stall(True))
        out["worker_fdatasync_stall_ms"] = asyncio.run(stall(False))
    finally:
        os.close(fd)
        buf.release()
    return out


# -- the full stack: daemon subprocess, simulated guest over the generic channel -----------------
def full_stack(image: Path, work: Path, quick: bool,
               plain: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The same workloads through `vmmiod run` and the generic IOREQ channel.

    Daemon CPU per request comes from /proc/<pid>/stat (10 ms ticks: enough requests are run
    for a few hundred ms of daemon CPU); it includes the IOREQ for each QueueNotify, the
    interrupt, and everything else the daemon does for the guest.
    """
    from vmmiod.sim.block import BlockDriver
    from vmmiod.sim.guest import probe_windows
    from vmmiod.sim.harness import DaemonProcess, GuestFiles, write_config
    from vmmiod.sim.vmm import SimVmm

    files = GuestFiles(work, image_size=image.stat().st_size)
    os.link(image, files.image)  # the same (warm) file under the name the harness expects
    write_config(files, net_peer_port=None, console=False, level="warning")
    daemon = DaemonProcess(files).start()
    results: dict[str, Any] = {}
    try:
        with SimVmm(ram_size=64 << 20) as vmm:
            vmm.connect(files.socket)
            dev = BlockDriver(vmm, probe_windows(vmm)["block"], queue_size=QUEUE_SIZE,
                              max_io=MIB1, depth=32)
            dev.start()
            size = dev.capacity * 512
            payload = {KIB4: os.urandom(KIB4), MIB1: os.urandom(MIB1)}
            for name, rtype, block, rand in WORKLOADS:
                for depth in (1, 32):
                    count = (2000 if quick else 10000) if block == KIB4 else (
                        128 if quick else 1024)
                    count -= count % depth
                    offsets = _offsets(size, block, count, rand, seed=3)
                    data = payload[block] if rtype == VIRTIO_BLK_T_OUT else None
                    cpu0, t0 = daemon.cpu_seconds(), time.perf_counter()
                    for i in range(0, count, depth):
                        for off in offsets[i:i + depth]:
                            dev.submit(rtype, off >> 9, data, 0 if data else block)
                        dev.kick()
                        if any(r.status != VIRTIO_BLK_S_OK for _, r in dev.wait_all()):
                            raise RuntimeError("a full-stack request failed")
                    wall = time.perf_counter() - t0
                    cpu = daemon.cpu_seconds() - cpu0
                    key = f"{name} qd{depth}"
                    r = {"iops": count / wall, "mb_s": count * block / wall / 1e6,
                         "daemon_cpu_us": cpu / count * 1e6}
                    base = plain.get(key)
                    if base is not None:
                        r["cpu_ratio"] = r["daemon_cpu_us"] / base["plain_cpu_us"]
                        r["throughput_ratio"] = r["mb_s"] / base["plain_mb_s"]
                    results[key] = r
            dev.stop()
    finally:
        daemon.kill()
        files.image.unlink(missing_ok=True)
    return results


def run(quick: bool = False, profile: bool = False) -> dict[str, Any]:
    size = (64 if quick else 256) << 20
    base = Path(os.environ.get("VMMIOD_BENCH_DIR", tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(dir=base, prefix="vmmiod-bench-blk-") as d:
        image = Path(d) / "bench.img"
        with open(image, "wb") as f:  # allocated, non-zero, page-cache warm
            chunk = os.urandom(MIB1)
            f.writelines(chunk for _ in range(size // MIB1))
        results: dict[str, Any] = {}
        for name, rtype, block, rand in WORKLOADS:
            for depth in (1, 32):
                count = (4000 if quick else 40000) if block == KIB4 else (256 if quick else 2048)
                count -= count % depth
                results[f"{name} qd{depth}"] = measure(image, size, name, rtype, block, rand,
                                                       depth, count, profile)
        results["dispatch"] = dispatch(image, size, 2000 if quick else 20000)
        stack_dir = Path(d) / "stack"
        stack_dir.mkdir()
        results["full_stack"] = full_stack(image, stack_dir, quick, results)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = run(quick="--quick" in argv, profile="--profile" in argv)
    print(f"{'virtio-blk workload':22} {'IOPS':>9} {'MB/s':>8} {'cpu us':>8} | "
          f"{'plain IOPS':>10} {'MB/s':>8} {'cpu us':>8} | {'cpu x':>6} {'tput %':>7}")
    for key, r in results.items():
        if key in ("dispatch", "full_stack"):
            continue
        print(f"{key:22} {r['iops']:9,.0f} {r['mb_s']:8,.0f} {r['cpu_us']:8.2f} | "
              f"{r['plain_iops']:10,.0f} {r['plain_mb_s']:8,.0f} {r['plain_cpu_us']:8.2f} | "
              f"{r['cpu_ratio']:6.2f} {r['throughput_ratio'] * 100:6.1f}%")
    print("\nfull stack: `vmmiod run` child + simulated guest over the generic IOREQ channel")
    print(f"{'virtio-blk workload':22} {'IOPS':>9} {'MB/s':>8} {'daemon cpu us':>14} | "
          f"{'cpu x plain':>11} {'tput %':>7}")
    for key, r in results["full_stack"].items():
        print(f"{key:22} {r['iops']:9,.0f} {r['mb_s']:8,.0f} {r['daemon_cpu_us']:14.2f} | "
              f"{r.get('cpu_ratio', 0):11.2f} {r.get('throughput_ratio', 0) * 100:6.1f}%")
    d = results["dispatch"]
    print("\nthreading model (why reads/writes run inline and fdatasync on a worker):")
    for k, v in d.items():
        print(f"  {k:32} {v:10.2f}")
    for key, r in results.items():
        if "profile" in r:
            print(f"\n--- profile: {key} (device side) ---\n{r['profile']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
