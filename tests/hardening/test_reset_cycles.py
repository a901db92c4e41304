"""A guest that resets its devices in the middle of I/O, re-probes and does it again, 1,000 times.

Each cycle, on every device: Linux's probe; block writes a 4 KiB record and FLUSHes it (that
record is now promised), then queues more writes and a FLUSH and resets the device at once,
while they are in flight; net queues frames and resets; console writes and resets. The guest
reuses the very same RAM every cycle (its allocator starts over), so a device that kept a view
or completed something after the reset would scribble on the next cycle's rings and buffers.

Measured in this process (the daemon's serving half runs in a thread here): open fds, memory
mappings and the daemon loop's asyncio tasks after a warm-up and at the end. Every promised
record is read back through the guest and from the image file every 100 cycles and at the end.
`VMMIOD_RESET_CYCLES` changes the count.
"""

from __future__ import annotations

import gc
import os
import random
import socket
import time
from pathlib import Path

from tests.hardening.inproc_guest import BLOCK_BASE, CON_BASE, NET_BASE, InprocGuest
from tests.hardening.stack import fd_count, map_count
from vmmiod.sim.block import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlockDriver,
)
from vmmiod.sim.console import ConsoleDriver
from vmmiod.sim.net import NetDriver
from vmmiod.sim.vring import Allocator

CYCLES = int(os.environ.get("VMMIOD_RESET_CYCLES", "1000"))
RECORD = 4096
SLOTS = 256  # promised records rotate over the first MiB
SCRATCH = 4096  # sectors: the in-flight writes land from 2 MiB on
WARMUP = 20
FRAME = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x01" + b"\x88\xb5" + b"reset-cycle" * 5


def _drain(sock: socket.socket) -> None:
    timeout = sock.gettimeout()
    sock.setblocking(False)  # a socket with a timeout polls before every recv, DONTWAIT or not
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.settimeout(timeout)


def _verify(g: InprocGuest, promised: dict[int, bytes]) -> None:
    """Every promised record, through the guest and in the image file."""
    g.vmm.alloc = Allocator(g.vmm.ram_gpa, g.vmm.ram_size)
    blk = BlockDriver(g.vmm, g.window(BLOCK_BASE), queue_size=64, max_io=RECORD, depth=16)
    blk.start()
    slots = sorted(promised)
    for pos in range(0, len(slots), blk.depth):
        batch = slots[pos:pos + blk.depth]
        for s in batch:
            blk.submit(VIRTIO_BLK_T_IN, s * 8, length=RECORD, token=s)
        blk.kick()
        for s, res in blk.wait_all():
            assert res.status == VIRTIO_BLK_S_OK and res.data == promised[s], f"record {s}"
    blk.drv.reset()
    with open(g.image, "rb") as f:
        for s in slots:
            assert os.pread(f.fileno(), RECORD, s * RECORD) == promised[s], f"image record {s}"


def test_reset_mid_io_reprobe_1000_times(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    promised: dict[int, bytes] = {}
    with InprocGuest(tmp_path) as g:
        vmm = g.vmm
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(g.console_path))
        before: tuple[int, int, int] = (0, 0, 0)
        inflight = 0
        t0 = time.perf_counter()
        for i in range(CYCLES):
            if i == WARMUP:
                gc.collect()
                before = (fd_count(), map_count(), g.tasks())
            vmm.alloc = Allocator(vmm.ram_gpa, vmm.ram_size)  # the same RAM, every cycle
            blk = BlockDriver(vmm, g.window(BLOCK_BASE), queue_size=32, max_io=16384, depth=8)
            blk.start()
            slot, data = i % SLOTS, rng.randbytes(RECORD)
            assert blk.request(VIRTIO_BLK_T_OUT, slot * 8, data).status == VIRTIO_BLK_S_OK
            assert blk.request(VIRTIO_BLK_T_FLUSH, 0).status == VIRTIO_BLK_S_OK
            promised[slot] = data
            for k in range(4):
                blk.submit(VIRTIO_BLK_T_OUT, SCRATCH + 32 * k, rng.randbytes(16384))
            blk.submit(VIRTIO_BLK_T_FLUSH, 0)
            blk.kick()
            inflight += (blk.q.avail_idx - blk.q.used_idx()) & 0xFFFF  # the guest's view
            blk.drv.reset()  # with (some of) those five in flight
            nic = NetDriver(vmm, g.window(NET_BASE), queue_size=16)
            nic.start()
            for _ in range(6):
                nic.send(FRAME)
            inflight += (nic.txq.avail_idx - nic.txq.used_idx()) & 0xFFFF
            nic.drv.reset()
            con = ConsoleDriver(vmm, g.window(CON_BASE), queue_size=8)
            con.start()
            con.write(b"cycle %d\n" % i)
            inflight += (con.txq.avail_idx - con.txq.used_idx()) & 0xFFFF
            con.drv.reset()
            _drain(g.peer)
            _drain(client)
            if (i + 1) % 100 == 0:
                _verify(g, promised)
        elapsed = time.perf_counter() - t0
        _verify(g, promised)
        client.close()
        gc.collect()
        time.sleep(0.3)  # the console notices the client's hang-up on its next tick
        after = (fd_count(), map_count(), g.tasks())
        counters = g.daemon.call(lambda: {n: dict(d.counters) for n, d in g.devices.items()})
        errors = g.errors()
    print(f"\nreset cycles: {CYCLES} in {elapsed:.1f} s; promised records verified: "
          f"{len(promised)} (every 100 cycles and at the end)")
    print(f"  requests not yet completed when the guest reset the device: {inflight}")
    print(f"  fds {before[0]} -> {after[0]}, mappings {before[1]} -> {after[1]}, "
          f"daemon asyncio tasks {before[2]} -> {after[2]}")
    print(f"  block: {counters['vda']['requests_out']} writes, "
          f"{counters['vda']['requests_flush']} flushes; net: {counters['net0']['tx_frames']} "
          f"frames sent; console: {counters['con0']['bytes_from_guest']} bytes from the guest")
    assert not errors, errors[:5]
    assert after[0] <= before[0], "file descriptors leaked"
    assert after[2] <= before[2], "asyncio tasks leaked"
    assert after[1] <= before[1] + 4, "memory mappings leaked"  # allocator arenas come and go
