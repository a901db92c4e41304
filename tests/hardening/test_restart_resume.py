"""The daemon SIGKILLed at random points, 50 times, while the simulated guest drives block, net
and console on the generic channel: each time systemd's part (a new `vmmiod run`) is played
by a killer thread, the VMM rejoins with the same RAM and ioreq page (the vCPU still waiting on
its request), and the devices carry on from the state record (docs/restart.md).

What the guest must see: no device reset (Status stays DRIVER_OK, no DEVICE_NEEDS_RESET), no
request lost (every block request completes OK and the whole written pattern reads back), every
frame it sent reaches the peer (a duplicate is allowed, a loss is not), every line it wrote to
the console reaches the host client (again duplicates allowed). The pauses (daemon gone ->
VMM connected again) and restart times (process start -> READY=1) are printed.
`VMMIOD_RESTART_CYCLES` changes the count.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import statistics
import struct
import threading
import time
from pathlib import Path

from tests.hardening.daemon_guest import DaemonGuest
from vmmiod.sim.block import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vmmiod.sim.harness import BLOCK_BASE, CONSOLE_BASE, NET_BASE, DaemonProcess

CYCLES = int(os.environ.get("VMMIOD_RESTART_CYCLES", "50"))
STATUS, DRIVER_OK, NEEDS_RESET = 0x070, 0x04, 0x40
SECTOR = 512
ETHERTYPE = 0x88B6


class ConsoleClient(threading.Thread):
    """A host console client that reconnects whenever the daemon's socket goes away."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = str(path)
        self.data = bytearray()
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                s.settimeout(0.2)
                while not self.stopping:
                    try:
                        chunk = s.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    self.data += chunk
            except OSError:
                time.sleep(0.01)
            finally:
                s.close()


class Peer(threading.Thread):
    """The net backend's remote: collects every frame."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.frames: list[bytes] = []
        self.stopping = False

    def run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopping:
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.frames.append(data)


def test_sigkill_at_random_points_guest_carries_on(tmp_path: Path) -> None:
    rng = random.Random(17)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    with DaemonGuest(tmp_path / "g", image, on_disconnect="wait") as g:
        assert g.blk and g.nic and g.con and g.vmm and g.peer and g.client
        g.client.close()  # the reconnecting client below takes over
        g.client = None
        g.vmm.rejoin = 30.0
        client = ConsoleClient(g.files.console)
        client.start()
        peer = Peer(g.peer)
        peer.start()
        restarts: list[float] = []
        started_ms: list[float] = []
        killer_done = threading.Event()
        killer_error: list[BaseException] = []

        def killer() -> None:
            try:
                for _ in range(CYCLES):
                    time.sleep(rng.uniform(0.02, 0.4))
                    old = g.daemon
                    assert old.proc is not None
                    os.kill(old.pid, signal.SIGKILL)
                    assert old.proc.wait(10) == -signal.SIGKILL
                    t0 = time.monotonic()
                    g.daemon = DaemonProcess(g.files).start()
                    restarts.append(time.monotonic() - t0)
            except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
                killer_error.append(exc)
            finally:
                killer_done.set()

        expected: dict[int, bytes] = {}
        sent_frames: list[bytes] = []
        lines: list[bytes] = []
        blk, nic, con, vmm = g.blk, g.nic, g.con, g.vmm
        sectors = (64 << 20) // SECTOR
        stats = {"rounds": 0, "requests": 0, "flushes": 0}
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        while not killer_done.is_set():
            stats["rounds"] += 1
            for _ in range(rng.randrange(1, blk.depth)):
                sector = rng.randrange(0, sectors - 64) // 8 * 8
                data = rng.randbytes(rng.randrange(1, 9) * 4096)
                blk.submit(VIRTIO_BLK_T_OUT, sector, data, token=(sector, data))
            if rng.random() < 0.3:
                blk.submit(VIRTIO_BLK_T_FLUSH, 0, token=None)
            blk.kick()
            for token, res in blk.wait_all():
                assert res.status == VIRTIO_BLK_S_OK
                stats["requests"] += 1
                if token is None:
                    stats["flushes"] += 1
                    continue
                sector, data = token
                for k in range(0, len(data), SECTOR):  # the newest write of each sector
                    expected[sector + k // SECTOR] = data[k:k + SECTOR]
            frame = (b"\xff" * 6 + nic.mac + struct.pack("!HI", ETHERTYPE, len(sent_frames))
                     + rng.randbytes(rng.randrange(40, 1400)))
            nic.send(frame)
            sent_frames.append(frame)
            line = f"line {len(lines)} {rng.randrange(1 << 30)}\n".encode()
            con.write(line)
            lines.append(line)
            for base in (BLOCK_BASE, NET_BASE, CONSOLE_BASE):
                status = vmm.read(base + STATUS)
                assert status & DRIVER_OK and not status & NEEDS_RESET, \
                    f"{base:#x}: the guest saw Status {status:#x}"
        thread.join()
        assert not killer_error, killer_error
        # Everything still in flight drains; then the whole pattern is read back.
        nic.flush_tx()
        con.flush()
        items = sorted(expected.items())
        for pos in range(0, len(items), 64):
            for sector, data in items[pos:pos + 64]:
                blk.submit(VIRTIO_BLK_T_IN, sector, length=SECTOR, token=(sector, data))
                if blk.q.pending() >= blk.depth:
                    blk.kick()
                    for (s, d), res in blk.wait_all():
                        assert res.status == VIRTIO_BLK_S_OK and res.data == d, f"sector {s}"
            blk.kick()
            for (s, d), res in blk.wait_all():
                assert res.status == VIRTIO_BLK_S_OK and res.data == d, f"sector {s}"
        deadline = time.monotonic() + 10
        want_console = b"".join(lines)
        while time.monotonic() < deadline:
            got = set(peer.frames)
            text = bytes(client.data)
            if all(f in got for f in sent_frames) and all(ln in text for ln in lines):
                break
            time.sleep(0.05)
        client.stopping = peer.stopping = True
        got = set(peer.frames)
        lost = [i for i, f in enumerate(sent_frames) if f not in got]
        assert not lost, f"{len(lost)} of {len(sent_frames)} frames never reached the peer"
        text = bytes(client.data)
        missing = [ln for ln in lines if ln not in text]
        assert not missing, f"{len(missing)} console lines lost, first {missing[0]!r}"
        events = g.daemon.log_events()
        bad = [e for e in events if e.get("event") in (
            "state_record_refused", "guest_protocol_violation", "device_needs_reset",
            "state_record_unavailable") or e.get("level") in ("error", "critical")]
        assert not bad, bad[:3]
        resumed = [e for e in events if e.get("event") == "state_resumed"]
        assert 0 < len(resumed) <= CYCLES  # an instance killed before the VMM came: none
        started_ms += [e["started_ms"] for e in events
                       if e.get("event") == "daemon_ready" and e.get("started_ms")]
        pauses = [b - a for a, b in vmm.rejoins]
        print(f"\nrestart resume: {CYCLES} SIGKILLs, {stats}, {len(sent_frames)} frames "
              f"({len(peer.frames) - len(sent_frames)} duplicates), {len(want_console)} console "
              f"bytes ({len(text) - len(want_console)} repeated), {len(expected)} sectors "
              f"verified, chains redone {sum(e.get('chains', 0) for e in resumed)}")
        print(f"restart (kill -> READY=1): median {statistics.median(restarts) * 1000:.0f} ms, "
              f"max {max(restarts) * 1000:.0f} ms; process start -> serving (daemon's "
              f"started_ms): median {statistics.median(started_ms):.0f} ms; guest pause "
              f"(daemon gone -> VMM connected): median {statistics.median(pauses) * 1000:.0f} "
              f"ms, max {max(pauses) * 1000:.0f} ms over {len(pauses)} rejoins")
