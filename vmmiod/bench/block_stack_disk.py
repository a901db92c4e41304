"""Real storage through the full stack: `vmmiod run` (default engine, `cache: none`) as a child
process, the simulated guest in this process over the generic IOREQ channel, fio alternated
with it on the same file.

The guest is a closed loop (like block_disk.ClosedLoop) but in its own process, so the daemon
goes on while the guest reissues: every completion is answered by the next request, `depth`
requests stay in the ring. Its driver is SlotDriver (vmmiod/sim/vring_slots.py: two stores per
request, every completion checked); its transport is Linux's virtio-mmio: a QueueNotify write
when the device asks for one (EVENT_IDX), and per interrupt the InterruptStatus read and the
InterruptACK write. Each of those is an IOREQ: a round trip to the daemon through the ioreq page
and two eventfds, which the daemon's CPU figure includes.

Rounds alternate fio and the full stack (fio, stack, fio, stack, ...) per job, so a change of
load falls on both; the ratio is per round and its median is the figure.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from vmmiod import barrier
from vmmiod.bench.block_disk import KIB4, MIB1, fio_job, offsets
from vmmiod.sim.block import DRIVER_FEATURES, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vmmiod.sim.guest import probe_windows
from vmmiod.sim.harness import DaemonProcess, GuestFiles, write_config
from vmmiod.sim.virtio_mmio import (
    QUEUE_DESC_LOW,
    QUEUE_DEVICE_LOW,
    QUEUE_DRIVER_LOW,
    QUEUE_NUM,
    QUEUE_NUM_MAX,
    QUEUE_READY,
    QUEUE_SEL,
    VirtioMmioDriver,
)
from vmmiod.sim.vmm import SimError, SimVmm
from vmmiod.sim.vring import Allocator
from vmmiod.sim.vring_slots import SlotDriver

QUEUE_SIZE = 256
# name, fio rw, block size, random, queue depths (quick run), queue depths (full run)
JOBS = (("randread-4k", "randread", KIB4, True, (1, 32), (1, 8, 32, 128)),
        ("randwrite-4k", "randwrite", KIB4, True, (1, 32), (1, 8, 32, 128)),
        ("seqread-1m", "read", MIB1, False, (), (8,)),
        ("seqwrite-1m", "write", MIB1, False, (), (8,)))


class StackGuest:
    """One virtio-blk device of the daemon, driven in a closed loop by a SlotDriver."""

    def __init__(self, vmm: SimVmm) -> None:
        self.vmm = vmm
        self.window = probe_windows(vmm)["block"]
        self.mmio = VirtioMmioDriver(vmm, self.window)

    def job(self, write: bool, block: int, rand: bool, depth: int,
            seconds: float) -> dict[str, float]:
        """Reset, set the queue up for this job, run it; guest-side figures."""
        mmio, vmm = self.mmio, self.vmm
        if mmio.probe() != 2:
            raise SimError("the daemon's first window is not a block device")
        mmio.negotiate(DRIVER_FEATURES)
        mmio.w32(QUEUE_SEL, 0)
        size = min(QUEUE_SIZE, mmio.r32(QUEUE_NUM_MAX))
        rtype = VIRTIO_BLK_T_OUT if write else VIRTIO_BLK_T_IN
        alloc = Allocator(vmm.ram_gpa, vmm.ram_size)  # the last job's buffers are free again
        drv = SlotDriver(vmm.memory, alloc, size, depth, block, rtype, write)
        mmio.w32(QUEUE_NUM, size)
        for low, addr in ((QUEUE_DESC_LOW, drv.desc_addr), (QUEUE_DRIVER_LOW, drv.avail_addr),
                          (QUEUE_DEVICE_LOW, drv.used_addr)):
            mmio.w32(low, addr & 0xFFFFFFFF)
            mmio.w32(low + 4, addr >> 32)
        mmio.w32(QUEUE_READY, 1)
        mmio.driver_ok()
        cap = mmio.config_read64(0) * 512
        it = offsets(cap, block, rand, seed=11)
        sectors = [next(it) >> 9 for _ in range(1 << 16)]
        irq, io0 = self.window.irq, vmm.ioreqs
        done = n = interrupts = 0
        c0, w0 = time.process_time(), time.perf_counter()
        deadline = w0 + seconds
        for slot in range(depth):
            drv.issue(slot, sectors[n & 0xFFFF])
            n += 1
        if drv.publish():
            mmio.notify(0)
        stopping = False
        while drv.outstanding:
            barrier.mb()  # used_event (written by the last reap) before used.idx is read again
            slots = drv.reap()
            if not slots:
                if not vmm.wait_irq(irq, 10.0):
                    raise SimError("no interrupt from the daemon within 10 s")
                interrupts += 1
                mmio.interrupt()  # vm_interrupt: InterruptStatus read, InterruptACK write
                continue
            done += len(slots)
            if not stopping:
                stopping = time.perf_counter() >= deadline
            if not stopping:
                for slot in slots:
                    drv.issue(slot, sectors[n & 0xFFFF])
                    n += 1
                if drv.publish():
                    mmio.notify(0)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        mmio.reset()
        return {"iops": done / wall, "guest_cpu_us": cpu / done * 1e6,
                "ioreqs_per_request": (vmm.ioreqs - io0) / done,
                "requests_per_interrupt": done / max(1, interrupts), "requests": done}


def _config(files: GuestFiles) -> None:
    write_config(files, net_peer_port=None, console=False, level="warning", cache="none")
    doc = yaml.safe_load(files.config.read_text())
    doc["devices"][0]["queue_size"] = QUEUE_SIZE
    files.config.write_text(yaml.safe_dump(doc, sort_keys=False))


def run(image: Path, work: Path, quick: bool, seconds: float | None = None) -> dict[str, Any]:
    """Every job: `rounds` x (fio, full stack), alternated, on `image` (filled, real storage)."""
    rounds, default = (1, 1.0) if quick else (3, 2.0)
    seconds = default if seconds is None else seconds
    have_fio = shutil.which("fio") is not None
    out: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "fio": have_fio,
                           "size": image.stat().st_size, "jobs": {}}
    files = GuestFiles(work, image_size=image.stat().st_size)
    files.image.hardlink_to(image)
    _config(files)
    daemon = DaemonProcess(files).start()
    try:
        with SimVmm(ram_size=64 << 20) as vmm:
            vmm.connect(files.socket)
            guest = StackGuest(vmm)
            for name, rw, block, rand, quick_depths, depths in JOBS:
                for depth in quick_depths if quick else depths:
                    per: list[dict[str, float]] = []
                    for _ in range(rounds):
                        r: dict[str, float] = {"load": round(os.getloadavg()[0], 2)}
                        if have_fio:
                            r["fio_iops"] = fio_job(image, rw, block, depth, seconds)["iops"]
                        d0 = daemon.cpu_seconds()
                        g = guest.job("write" in rw, block, rand, depth, seconds)
                        cpu = daemon.cpu_seconds() - d0
                        r.update(stack_iops=g["iops"],
                                 daemon_cpu_us=cpu / g["requests"] * 1e6,
                                 guest_cpu_us=g["guest_cpu_us"],
                                 ioreqs_per_request=g["ioreqs_per_request"],
                                 requests_per_interrupt=g["requests_per_interrupt"])
                        if have_fio:
                            r["ratio"] = r["stack_iops"] / r["fio_iops"]
                        per.append(r)
                    # Rounds keyed by number: `vmmiod bench`'s table flattens dicts, not lists.
                    job: dict[str, Any] = {"rounds": {str(i + 1): x for i, x in enumerate(per)}}
                    if have_fio:
                        job["median_ratio"] = statistics.median(x["ratio"] for x in per)
                    out["jobs"][f"{name} qd{depth}"] = job
    finally:
        daemon.kill()
        files.image.unlink(missing_ok=True)
    return out


def report(res: dict[str, Any]) -> list[str]:
    lines = [("full stack on real storage: `vmmiod run` (default engine, cache: none) + the "
             "simulated guest (own process)"),
             f"image {res['size'] >> 20} MiB; {res['rounds']} round(s) of fio then the stack, "
             f"{res['seconds']:g} s each" + ("" if res["fio"] else "; fio not installed"),
             (f"{'job':18} {'median':>7} | per round: load, fio IOPS, stack IOPS, ratio, "
             "daemon CPU us/req, guest CPU us/req, IOREQs/req, req/interrupt")]
    for key, job in res["jobs"].items():
        med = f"{job['median_ratio'] * 100:6.0f}%" if "median_ratio" in job else f"{'-':>7}"
        cells = []
        for r in job["rounds"].values():
            ratio = f"{r['ratio'] * 100:.0f}%" if "ratio" in r else "-"
            cells.append(f"[{r['load']:.1f} {r.get('fio_iops', 0):,.0f} {r['stack_iops']:,.0f} "
                         f"{ratio} {r['daemon_cpu_us']:.1f} {r['guest_cpu_us']:.1f} "
                         f"{r['ioreqs_per_request']:.2f} {r['requests_per_interrupt']:.1f}]")
        lines.append(f"{key:18} {med} | " + " ".join(cells))
    return lines
