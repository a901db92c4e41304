"""The whole path through the generic IOREQ channel: a real daemon (`vmmiod run`, a child
process) and the simulated guest (this process), nothing in between.

Figures:
- IOREQ round trips per second: a register read (MagicValue) from the guest's vCPU, answered by
  the daemon through the shared page and two eventfds; daemon CPU per round trip. Then the two
  IOREQs a virtio-mmio guest makes per interrupt (InterruptStatus read, InterruptACK write),
  each timed alone. Daemon CPU per round trip is from /proc/<pid>/task/*/schedstat (ns). The
  round trips are timed after WARM_UP seconds of them: on a VM whose idle vCPUs halt (this
  project's development machine), the first few thousand wake-ups after an idle spell cost
  several times more in the kernel and hypervisor (docs/performance.md, "One IOREQ").
- notify-to-interrupt latency: QueueNotify of one 4 KiB block read until the interrupt eventfd
  fires in the guest (median, p99).
- block: 4 KiB random reads and writes at queue depth 32, 128 KiB sequential reads at depth 8:
  IOPS, MB/s, daemon CPU per request, and the ratio of that to a plain Python loop doing the
  same os.preadv/os.pwritev on the same file (CPU per request, measured in this run).
- net: frames per second guest -> backend and backend -> guest (dgram backend, UDP).
Daemon CPU comes from /proc/<pid>/stat; it includes everything the daemon does for the guest.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from vmmiod.sim.block import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlockDriver
from vmmiod.sim.guest import probe_windows
from vmmiod.sim.harness import DaemonProcess, GuestFiles, write_config
from vmmiod.sim.net import NetDriver, run_net_workload, udp_peer
from vmmiod.sim.virtio_mmio import INTERRUPT_ACK, INTERRUPT_STATUS, MAGIC_VALUE
from vmmiod.sim.vmm import SimError, SimVmm

SECTOR = 512
WARM_UP = 1.0  # seconds of round trips before the timed ones (quick: a third)


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run_time(pid: int) -> float:
    """Seconds every thread of `pid` has run (schedstat, ns: finer than /proc/<pid>/stat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def ioreq_round_trips(vmm: SimVmm, daemon: DaemonProcess, base: int, n: int,
                      offset: int = MAGIC_VALUE, write: bool = False,
                      warm_up: float = 0.0) -> dict[str, Any]:
    """`n` register accesses at `base + offset` (reads, or writes of 0), one at a time, after
    100 of them or `warm_up` seconds of them, whichever is longer."""
    addr = base + offset

    def access() -> None:
        if write:
            vmm.write(addr, 0)
        else:
            vmm.read(addr)

    for _ in range(100):
        access()
    until = time.perf_counter() + warm_up
    while time.perf_counter() < until:
        access()
    cpu0, t0 = run_time(daemon.pid), time.perf_counter()
    for _ in range(n):
        access()
    wall, cpu = time.perf_counter() - t0, run_time(daemon.pid) - cpu0
    return {"round_trips_per_s": round(n / wall), "us_per_round_trip": round(1e6 * wall / n, 2),
            "daemon_cpu_us_per_round_trip": round(1e6 * cpu / n, 2)}


def notify_to_interrupt(dev: BlockDriver, n: int) -> dict[str, Any]:
    vmm, drv, q = dev.vmm, dev.drv, dev.q
    samples: list[float] = []
    for i in range(n):
        dev.submit(VIRTIO_BLK_T_IN, (i * 8) % 2048, length=4096)
        q.kick_prepare()  # publish; the notify below is unconditional, as with an idle device
        t0 = time.perf_counter()
        drv.notify(q.index)
        if not vmm.wait_irq(drv.window.irq):
            raise SimError("no interrupt after QueueNotify")
        samples.append(time.perf_counter() - t0)
        drv.interrupt()
        dev.wait_all()
    return {"median_us": round(1e6 * statistics.median(samples), 1),
            "p99_us": round(1e6 * _percentile(samples, 99), 1), "samples": n}


def block_run(dev: BlockDriver, daemon: DaemonProcess, rtype: int, size: int, depth: int,
              n: int, span: int, sequential: bool, rng: random.Random) -> dict[str, Any]:
    payload = rng.randbytes(size) if rtype == VIRTIO_BLK_T_OUT else None
    slots = span // size
    pos = 0
    inflight = done = errors = 0
    got: list[Any] = []

    def ready() -> bool:
        got.extend(dev.complete())
        return bool(got)

    cpu0, t0 = daemon.cpu_seconds(), time.perf_counter()
    while done < n:
        while inflight < depth and done + inflight < n:
            k = pos % slots if sequential else rng.randrange(slots)
            pos += 1
            dev.submit(rtype, k * size // SECTOR, payload, length=size)
            inflight += 1
        dev.kick()
        got.clear()
        dev.drv.wait(ready)
        done += len(got)
        inflight -= len(got)
        errors += sum(1 for _, r in got if r.status != 0)
    wall, cpu = time.perf_counter() - t0, daemon.cpu_seconds() - cpu0
    return {"iops": round(n / wall), "mb_per_s": round(n * size / wall / 1e6, 1),
            "daemon_cpu_us_per_request": round(1e6 * cpu / n, 1), "errors": errors}


def plain_loop(path: Path, write: bool, size: int, n: int, span: int, sequential: bool,
               rng: random.Random) -> float:
    """CPU microseconds per request of the least Python can do: os.preadv/pwritev in a loop."""
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytearray(size)
        slots = span // size
        offsets = [((i % slots) if sequential else rng.randrange(slots)) * size for i in range(n)]
        op = os.pwritev if write else os.preadv
        c0 = time.process_time()
        for off in offsets:
            op(fd, [buf], off)
        return 1e6 * (time.process_time() - c0) / n
    finally:
        os.close(fd)


def run(quick: bool = False) -> dict[str, Any]:
    rng = random.Random(5)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vmmiod-bench-") as tmp:
        files = GuestFiles(Path(tmp), image_size=(16 << 20) if quick else (64 << 20))
        peer = udp_peer()
        write_config(files, net_peer_port=peer.getsockname()[1], console=False,
                     level="warning")
        with open(files.image, "r+b") as f:  # real data, page-cache warm: I/O, not holes
            f.write(os.urandom(files.image_size))
        span = files.image_size
        with DaemonProcess(files) as daemon, SimVmm(ram_size=128 << 20) as vmm:
            vmm.connect(files.socket)
            windows = probe_windows(vmm)
            base, rounds = windows["block"].base, 3000 if quick else 30000
            out["ioreq"] = ioreq_round_trips(vmm, daemon, base, rounds,
                                             warm_up=WARM_UP / 3 if quick else WARM_UP)
            out["ioreq_interrupt_status_read"] = ioreq_round_trips(
                vmm, daemon, base, rounds, INTERRUPT_STATUS)
            out["ioreq_interrupt_ack_write"] = ioreq_round_trips(
                vmm, daemon, base, rounds, INTERRUPT_ACK, write=True)
            blk = BlockDriver(vmm, windows["block"], max_io=128 * 1024, depth=32)
            blk.start()
            out["notify_to_interrupt"] = notify_to_interrupt(blk, 300 if quick else 3000)
            n4k = 3000 if quick else 30000
            cases = [("block_randread_4k_qd32", VIRTIO_BLK_T_IN, 4096, 32, n4k, False),
                     ("block_randwrite_4k_qd32", VIRTIO_BLK_T_OUT, 4096, 32, n4k, False),
                     ("block_seqread_128k_qd8", VIRTIO_BLK_T_IN, 128 << 10, 8, n4k // 10, True)]
            for name, rtype, size, depth, n, seq in cases:
                res = block_run(blk, daemon, rtype, size, depth, n, span, seq, rng)
                plain = plain_loop(files.image, rtype == VIRTIO_BLK_T_OUT, size, n, span, seq,
                                   rng)
                res["plain_loop_cpu_us_per_request"] = round(plain, 2)
                res["cpu_ratio_to_plain_loop"] = round(
                    res["daemon_cpu_us_per_request"] / plain, 1) if plain else None
                out[name] = res
            blk.stop()
            nic = NetDriver(vmm, windows["net"])
            nic.start()
            frames = 2000 if quick else 20000
            cpu0 = daemon.cpu_seconds()
            res = run_net_workload(nic, peer, frames=frames)
            cpu = daemon.cpu_seconds() - cpu0
            out["net"] = {"tx_frames_per_s": res["tx_frames_per_s"],
                          "rx_frames_per_s": res["rx_frames_per_s"],
                          "daemon_cpu_us_per_frame": round(1e6 * cpu / (2 * frames), 1),
                          "errors": len(res["failures"])}
            nic.stop()
        peer.close()
    return out


if __name__ == "__main__":
    import json

    from vmmiod.bench.options import quick_option

    quick = quick_option("channel", "Generic IOREQ channel figures, as JSON: IOREQ round trips, "
                         "notify-to-interrupt latency, block and net through `vmmiod run`.")
    print(json.dumps(run(quick=quick), indent=2))
