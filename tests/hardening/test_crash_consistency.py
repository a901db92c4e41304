"""Crash consistency: the daemon SIGKILLed at random points while the guest writes and flushes,
50 times; every write acknowledged before a FLUSH that completed is in the image, byte for byte.

Each cycle starts `vmmiod run` (generic channel, as systemd would, READY=1 awaited), connects
the simulated guest, and streams batches of writes of random sizes, each batch followed by a
FLUSH, into the cycle's own area of the image, while a timer thread SIGKILLs the daemon after a
random 0-300 ms: during a batch, a FLUSH, or between them. The cache mode rotates (writeback,
writethrough, none), and with it the block I/O engine (io_uring, threads, sync). After each kill the image file is checked; after all of them a fresh
daemon serves the guest and every promised write is read back through it as well.
`VMMIOD_CRASH_CYCLES` changes the count.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

from tests.hardening.daemon_guest import write_guest
from tests.test_block_harness import uring_available
from vmmiod.sim.block import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlockDriver,
)
from vmmiod.sim.harness import BLOCK_BASE, DaemonProcess, GuestFiles
from vmmiod.sim.vmm import SimError, SimVmm

CYCLES = int(os.environ.get("VMMIOD_CRASH_CYCLES", "50"))
IMAGE = 1 << 30  # sparse; a 20 MiB area per cycle, so most kills land mid-stream
CACHES = ("writeback", "writethrough", "none")
ENGINES = ("io_uring", "threads", "sync") if uring_available() else ("threads", "sync")
SECTOR = 512


def _guest(files: GuestFiles) -> tuple[SimVmm, BlockDriver]:
    vmm = SimVmm(ram_size=32 << 20, timeout=10.0)
    server = vmm.connect(files.socket, wait=10.0)
    (window,) = [w for w in server.windows if w.base == BLOCK_BASE]
    blk = BlockDriver(vmm, window, queue_size=64, max_io=32 << 10, depth=16)
    blk.start()
    return vmm, blk


def _run_until_killed(blk: BlockDriver, area: range, rng: random.Random,
                      promised: dict[int, bytes], stats: dict[str, int]) -> None:
    """Batches of writes, each followed by a FLUSH; writes acknowledged before a FLUSH that
    completed are promised. Returns when the daemon is gone."""
    cursor = area.start
    acked: dict[int, bytes] = {}
    phase = "start"
    try:
        while True:
            phase = "writes"
            n = 0
            for _ in range(rng.randrange(1, blk.depth + 1)):
                size = rng.randrange(1, 65) * SECTOR
                if cursor + size // SECTOR > area.stop:
                    break
                data = rng.randbytes(size)
                blk.submit(VIRTIO_BLK_T_OUT, cursor, data, token=(cursor, data))
                cursor += size // SECTOR
                n += 1
            if n:
                blk.kick()
                for (sector, data), res in blk.wait_all():
                    assert res.status == VIRTIO_BLK_S_OK
                    acked[sector] = data
                    stats["acked"] += 1
            phase = "flush"
            assert blk.request(VIRTIO_BLK_T_FLUSH, 0).status == VIRTIO_BLK_S_OK
            stats["flushes"] += 1
            promised.update(acked)
            acked.clear()
    except SimError:
        stats[f"killed_during_{phase}"] += 1
        stats["acked_not_flushed"] += len(acked)


def _check_image(image: Path, promised: dict[int, bytes]) -> None:
    with open(image, "rb") as f:
        for sector, data in promised.items():
            assert os.pread(f.fileno(), len(data), sector * SECTOR) == data, \
                f"promised write at sector {sector} ({len(data)} bytes) is not in the image"


def test_sigkill_at_random_points_loses_no_flushed_write(tmp_path: Path) -> None:
    rng = random.Random(1125)
    files = GuestFiles(tmp_path)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE)
    area_sectors = IMAGE // SECTOR // CYCLES
    promised: dict[int, bytes] = {}
    stats = {"acked": 0, "flushes": 0, "acked_not_flushed": 0, "killed_during_start": 0,
             "killed_during_writes": 0, "killed_during_flush": 0}
    t0 = time.perf_counter()
    for cycle in range(CYCLES):
        write_guest(files, image, net_port=None, console=False, cache=CACHES[cycle % 3],
                    io_engine=ENGINES[cycle // 3 % 3])  # every cache mode with every engine
        daemon = DaemonProcess(files).start()
        vmm, blk = _guest(files)
        delay = rng.uniform(0.0, 0.3)
        killer = threading.Timer(delay, os.kill, (daemon.pid, signal.SIGKILL))
        killer.start()
        try:
            area = range(cycle * area_sectors, (cycle + 1) * area_sectors)
            _run_until_killed(blk, area, rng, promised, stats)
        finally:
            killer.join()
            assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
            vmm.close()
        _check_image(image, promised)
    elapsed = time.perf_counter() - t0
    # A last daemon: everything promised, read back through the guest.
    write_guest(files, image, net_port=None, console=False)
    daemon = DaemonProcess(files).start()
    try:
        vmm, blk = _guest(files)
        items = sorted(promised.items())
        for pos in range(0, len(items), blk.depth):
            for sector, data in items[pos:pos + blk.depth]:
                blk.submit(VIRTIO_BLK_T_IN, sector, length=len(data), token=(sector, data))
            blk.kick()
            for (sector, data), res in blk.wait_all():
                assert res.status == VIRTIO_BLK_S_OK and res.data == data, f"sector {sector}"
        vmm.close()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    size = sum(len(d) for d in promised.values())
    print(f"\ncrash consistency: {CYCLES} SIGKILLs in {elapsed:.1f} s; {len(promised)} promised "
          f"writes ({size >> 10} KiB) all in the image and read back; {stats}")
    assert stats["flushes"] and promised
