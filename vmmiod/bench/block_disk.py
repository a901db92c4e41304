"""virtio-blk on real storage: vmmiod next to fio and a plain Python loop, same file, same run.

The image is a file in VMMIOD_BENCH_DIR (default: the temp dir), filled with data (reads of
unwritten extents would cost the disk nothing), opened with O_DIRECT (`cache: none`), so every
request reaches the device. For each job (4 KiB random read and write at queue depth 1, 8, 32,
128; 1 MiB sequential read and write at depth 8), in this order and back to back:

- fio (when installed): the same job with libaio and direct=1, the reference;
- vmmiod: a BlockDevice in this process, with a closed-loop guest (the fixed-slot driver of
  vmmiod/sim/vring_slots.py in memfd guest RAM) keeping `depth` requests in the ring: each
  completion is answered by the next request, as a guest at that queue depth does. The guest
  model runs on the device's thread, so it is as cheap as a driver can be (two stores per
  request, every completion still checked). CPU per request counts this whole process
  (device, engine threads and the driver model); "device" subtracts the model's thread CPU;
- a plain Python loop: `depth` threads doing os.preadv/os.pwritev with O_DIRECT, nothing else.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmmiod.config import BlockConfig, GuestConfig, MmioConfig
from vmmiod.devices.block import BlockDevice
from vmmiod.devices.block_request import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vmmiod.memory import memfd_memory
from vmmiod.sim.vring import Allocator
from vmmiod.sim.vring_slots import SlotDriver
from vmmiod.virtqueue import SplitQueue

GPA = 0x4000_0000
QUEUE_SIZE = 256
KIB4, MIB1 = 4096, 1 << 20
# name, fio rw, block size, random, queue depths
JOBS = (("randread-4k", "randread", KIB4, True, (1, 8, 32, 128)),
        ("randwrite-4k", "randwrite", KIB4, True, (1, 8, 32, 128)),
        ("seqread-1m", "read", MIB1, False, (8,)),
        ("seqwrite-1m", "write", MIB1, False, (8,)))


class NullLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: self

    def bind(self, **kw: Any) -> NullLog:
        return self


def new_loop() -> asyncio.AbstractEventLoop:
    """The daemon's choice: uvloop when installed."""
    try:
        import uvloop
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    except ImportError:
        return asyncio.new_event_loop()


def storage(path: Path) -> str:
    """Filesystem, source and block device (model, rotational) under `path`."""
    st = os.stat(path)
    fs = src = "?"
    best = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fields = left.split()
            mnt = fields[4]
            if str(path).startswith(mnt) and len(mnt) >= len(best) and \
                    fields[2] == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}":
                best, (fs, src) = mnt, right.split()[:2]
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sys_dev = Path(f"/sys/dev/block/{dev}")
    name = sys_dev.resolve().name if sys_dev.exists() else "?"
    model, rot = "?", "?"
    for base in (sys_dev, sys_dev / ".."):
        if (base / "queue/rotational").exists():
            rot = (base / "queue/rotational").read_text().strip()
        if (base / "device/model").exists():
            model = (base / "device/model").read_text().strip()
    kind = {"0": "non-rotational", "1": "rotational"}.get(rot, "?")
    return f"{fs} on {src} (block device {name} {dev}, {model}, {kind})"


def make_image(where: Path, size: int) -> Path:
    image = where / "bench-disk.img"
    chunk = os.urandom(MIB1)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, size, MIB1):
            os.pwrite(fd, chunk, off)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return image


def offsets(size: int, block: int, rand: bool, seed: int) -> Iterator[int]:
    slots = size // block
    if rand:
        rng = random.Random(seed)
        while True:
            yield rng.randrange(slots) * block
    i = seed * 997 % slots
    while True:
        yield i * block
        i = (i + 1) % slots


# -- fio --------------------------------------------------------------------------------------
def fio_job(image: Path, rw: str, block: int, depth: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=bench", f"--filename={image}", "--direct=1", "--ioengine=libaio",
         f"--rw={rw}", f"--bs={block}", f"--iodepth={depth}", f"--runtime={seconds}",
         "--time_based", "--norandommap", "--randrepeat=0", "--output-format=json",
         f"--size={image.stat().st_size}"],
        capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    ios = max(1, side["total_ios"])
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["elapsed"] if job.get("elapsed") else 0.0
    return {"iops": side["iops"], "lat_us": side["clat_ns"]["mean"] / 1e3,
            "cpu_us": cpu / ios * 1e6 if cpu else float("nan")}


# -- the plain loop ---------------------------------------------------------------------------
def plain_job(image: Path, write: bool, block: int, rand: bool, depth: int,
              seconds: float) -> dict[str, float]:
    fd = os.open(image, os.O_RDWR | os.O_DIRECT)
    size = image.stat().st_size
    counts = [0] * depth
    deadline = time.perf_counter() + seconds
    op = os.pwritev if write else os.preadv

    def worker(i: int) -> None:
        buf = mmap.mmap(-1, block)
        buf[:] = os.urandom(block) if write else bytes(block)
        v = memoryview(buf)
        n = 0
        it = offsets(size, block, rand, seed=100 + i)
        while time.perf_counter() < deadline:
            op(fd, [v], next(it))
            n += 1
        counts[i] = n
        v.release()
        buf.close()

    c0, w0 = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    os.close(fd)
    total = max(1, sum(counts))
    return {"iops": total / wall, "lat_us": wall / total * depth * 1e6,
            "cpu_us": cpu / total * 1e6}


# -- vmmiod: a device and a closed-loop guest in this process ----------------------------------
class ClosedLoop:
    """`depth` requests always in the ring: each completion is answered by the next request."""

    def __init__(self, image: Path, engine: str, write: bool, block: int, rand: bool,
                 depth: int, cache: str = "none") -> None:
        cfg = BlockConfig(id="bench", mmio=MmioConfig(base=0x1000_0000, irq=5), path=image,
                          cache=cache, queue_size=QUEUE_SIZE, lock=False,  # type: ignore[arg-type]
                          io_engine=engine)  # type: ignore[arg-type]
        self.dev = BlockDevice(cfg, GuestConfig("bench"), log=NullLog())
        self.rtype = VIRTIO_BLK_T_OUT if write else VIRTIO_BLK_T_IN
        self.block, self.depth = block, depth
        self.size = image.stat().st_size
        self.it = offsets(self.size, block, rand, seed=7)
        self.done = 0
        # Time spent in the guest model's handler (not the device's). Wall time from the vDSO
        # clock: a thread CPU clock is a system call, two per interrupt, which would add to the
        # latency measured; the handler runs for microseconds, so the two hardly differ.
        self.guest_cpu = 0.0
        self.stopping = False
        self.idle: asyncio.Future[None] | None = None

    async def start(self) -> None:
        await self.dev.open()
        mem_size = self.depth * (self.block + 64) + (8 << 20)
        self.mem, self.memfd = memfd_memory(mem_size, GPA, "vmmiod-bench-disk")
        alloc = Allocator(GPA, mem_size)
        self.drv = SlotDriver(self.mem, alloc, QUEUE_SIZE, self.depth, self.block, self.rtype,
                              self.rtype == VIRTIO_BLK_T_OUT)
        q = SplitQueue(QUEUE_SIZE)
        q.desc_addr, q.avail_addr, q.used_addr = (self.drv.desc_addr, self.drv.avail_addr,
                                                  self.drv.used_addr)
        q.activate(self.mem, event_idx=True, indirect=True)
        self.dev.activate(self.mem, [q], self.dev.device_features(), self)
        for data in self.drv.data:
            self.mem.write(data, os.urandom(self.block))
        # The offsets drawn up front: the guest model's CPU is the device's in this process.
        self.sectors = [next(self.it) >> 9 for _ in range(1 << 18)]
        self.next = 0

    def run(self) -> None:
        for i in range(self.depth):
            self._issue(i)
        if self.drv.publish():
            self.dev.queue_notify(0)

    def _issue(self, slot: int) -> None:
        n = self.next
        self.drv.issue(slot, self.sectors[n & 0x3FFFF])
        self.next = n + 1

    # Transport: the device's interrupt is the guest's completion handler.
    def signal_used(self, queue_index: int) -> None:
        t0 = time.perf_counter()
        drv = self.drv
        slots = drv.reap()  # (each one checked: id in flight, used length, status OK)
        self.done += len(slots)
        kick = False
        if slots and not self.stopping:
            issue, sectors, n = drv.issue, self.sectors, self.next
            for slot in slots:
                issue(slot, sectors[n & 0x3FFFF])
                n += 1
            self.next = n
            kick = drv.publish()
        self.guest_cpu += time.perf_counter() - t0
        if kick:
            self.dev.queue_notify(0)
        if self.stopping and not drv.outstanding and self.idle and not self.idle.done():
            self.idle.set_result(None)

    def signal_config_change(self) -> None:
        pass

    def device_fault(self, reason: str) -> None:
        raise RuntimeError(f"device fault in benchmark: {reason}")

    async def drain(self) -> None:
        self.stopping = True
        if self.drv.outstanding:
            self.idle = asyncio.get_running_loop().create_future()
            await self.idle

    async def close(self) -> None:
        self.dev.reset()
        await self.dev.close()
        self.mem.close()
        os.close(self.memfd)


async def _vmmiod_job(image: Path, engine: str, write: bool, block: int, rand: bool,
                      depth: int, seconds: float) -> dict[str, float]:
    cl = ClosedLoop(image, engine, write, block, rand, depth)
    await cl.start()
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        cl.run()
        await asyncio.sleep(seconds)
        await cl.drain()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        stats = cl.dev.stats()
    finally:
        await cl.close()
    n = max(1, cl.done)
    # The CPU the io_uring engine spent looking at its completion ring (blockio/poll.py): part
    # of cpu_us, shown apart so that the cost of polling is in the figures.
    return {"iops": n / wall, "lat_us": wall / n * depth * 1e6, "cpu_us": cpu / n * 1e6,
            "device_cpu_us": (cpu - cl.guest_cpu) / n * 1e6,
            "poll_us": stats["io_poll_us"] / n,
            "poll_hit_rate": stats["io_poll_hits"] / max(1, stats["io_poll_hits"]
                                                       + stats["io_poll_misses"])}


def vmmiod_job(image: Path, engine: str, write: bool, block: int, rand: bool, depth: int,
               seconds: float) -> dict[str, float]:
    loop = new_loop()
    try:
        return loop.run_until_complete(
            _vmmiod_job(image, engine, write, block, rand, depth, seconds))
    finally:
        loop.close()


def run(where: Path, quick: bool, engines: tuple[str, ...]) -> dict[str, Any]:
    size = (256 if quick else 1024) << 20
    seconds = 1.0 if quick else 3.0
    image = make_image(where, size)
    have_fio = shutil.which("fio") is not None
    out: dict[str, Any] = {"storage": storage(image), "size": size, "seconds": seconds,
                           "fio": have_fio, "jobs": {}}
    try:
        for name, rw, block, rand, depths in JOBS:
            write = "write" in rw
            for depth in depths:
                r: dict[str, Any] = {}
                if have_fio:
                    r["fio"] = fio_job(image, rw, block, depth, seconds)
                for engine in engines:
                    r[engine] = vmmiod_job(image, engine, write, block, rand, depth, seconds)
                r["plain"] = plain_job(image, write, block, rand, depth, seconds)
                if have_fio:  # the ratios the goals are stated in
                    ref = r["fio"]["iops"]
                    r["ratio_vs_fio"] = {k: r[k]["iops"] / ref for k in (*engines, "plain")}
                out["jobs"][f"{name} qd{depth}"] = r
    finally:
        image.unlink()
    return out


def report(res: dict[str, Any], engines: tuple[str, ...]) -> list[str]:
    lines = [f"real storage: {res['storage']}",
             f"image {res['size'] >> 20} MiB, O_DIRECT, {res['seconds']:.0f} s per job"
             + ("" if res["fio"] else "; fio not installed: no reference column")]
    head = f"{'job':20}" + "".join(f" {k + ' IOPS':>14}" for k in ("fio", *engines, "plain"))
    head += "".join(f" {e + '/fio':>13}" for e in engines) + f" {'plain/fio':>10}"
    lines.append(head)
    for key, r in res["jobs"].items():
        ref = r.get("fio", {}).get("iops")
        row = f"{key:20}" + "".join(
            f" {r[k]['iops']:14,.0f}" if k in r else f" {'-':>14}" for k in ("fio", *engines,
                                                                           "plain"))
        for k in (*engines, "plain"):
            row += f" {r[k]['iops'] / ref * 100:12.0f}%" if ref else f" {'-':>13}"
        lines.append(row)
    lines.append("CPU us per request (process CPU: vmmiod = device + engine + guest model):")
    for key, r in res["jobs"].items():
        lines.append(f"  {key:20}" + "".join(f" {k}={r[k]['cpu_us']:.1f}" for k in r
                                               if k != "ratio_vs_fio")
                     + "".join(f" {e}-device-only={r[e]['device_cpu_us']:.1f}" for e in engines)
                     + "".join(f" {e}-polling={r[e]['poll_us']:.1f}"
                               f" ({r[e]['poll_hit_rate'] * 100:.0f}% hits)"
                               for e in engines if r[e].get("poll_us")))
    return lines
