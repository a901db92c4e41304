"""virtio-blk through the full stack: `vmmiod run` as a child process and the simulated guest
over the generic IOREQ channel, the daemon's CPU per request next to the plain loop's."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from vmmiod.bench.block_workloads import KIB4, MIB1, QUEUE_SIZE, WORKLOADS, _offsets
from vmmiod.devices.block_request import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT


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


