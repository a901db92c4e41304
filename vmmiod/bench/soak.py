"""Soak: a real daemon kept busy on all three devices for a long time, its RSS and fds sampled.

    python -m vmmiod.bench.soak --minutes 10          # the long run (default 10 minutes)
    python -m vmmiod.bench.soak --seconds 60 --json   # what CI runs (tests/hardening/test_soak.py)

`vmmiod run` is started as systemd would (generic channel, READY=1 awaited); the simulated
guest drives, round-robin until the deadline: block (batches of writes and reads over 16 MiB,
every byte read compared with what was written, a FLUSH every few batches), net (frames to the
dgram peer and back, compared) and console (a line echoed through the socket client and a 16 KiB
burst to it). The daemon's VmRSS, RssAnon and open fds are sampled every `--interval` seconds;
the first sample after the warm-up (a tenth of the run) is "start". Errors are the daemon's log
records at error level or above and every `guest_protocol_violation`; they are counted, not
hidden. Figures only: the test that runs this asserts flatness, this module asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmmiod.sim.block import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlockDriver,
)
from vmmiod.sim.console import ConsoleDriver, connect_console
from vmmiod.sim.harness import (
    BLOCK_BASE,
    CONSOLE_BASE,
    NET_BASE,
    DaemonProcess,
    GuestFiles,
    write_config,
)
from vmmiod.sim.net import NetDriver, make_frame, udp_peer
from vmmiod.sim.vmm import SimVmm

SPAN = 16 << 20
IO_SIZES = (4096, 16384, 65536)
FRAMES_PER_TURN = 32
CONSOLE_BURST = 16 << 10


def proc_figures(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon (KiB) and open fds of a process."""
    out = {"rss_kib": 0, "rss_anon_kib": 0, "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                out["rss_anon_kib"] = int(line.split()[1])
    return out


class Soak:
    def __init__(self, where: Path, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.files = GuestFiles(where, image_size=SPAN * 2)
        self.peer = udp_peer()
        self.peer.settimeout(10)
        write_config(self.files, net_peer_port=self.peer.getsockname()[1], on_disconnect="wait")
        self.daemon = DaemonProcess(self.files)
        self.vmm = SimVmm(ram_size=64 << 20, timeout=10.0)
        self.shadow = bytearray(SPAN)
        self.counts = {"block_requests": 0, "block_bytes": 0, "flushes": 0, "frames": 0,
                       "console_bytes": 0, "mismatches": 0}
        self.backend_addr: Any = None

    def start(self) -> None:
        self.daemon.start()
        server = self.vmm.connect(self.files.socket, wait=10.0)
        by_base = {w.base: w for w in server.windows}
        self.blk = BlockDriver(self.vmm, by_base[BLOCK_BASE], queue_size=128, depth=16,
                               max_io=max(IO_SIZES))
        self.blk.start()
        self.nic = NetDriver(self.vmm, by_base[NET_BASE], queue_size=128)
        self.nic.start()
        self.con = ConsoleDriver(self.vmm, by_base[CONSOLE_BASE], queue_size=32)
        self.con.start()
        self.client = connect_console(str(self.files.console))

    # -- one turn of each device --------------------------------------------------------------
    def block_turn(self) -> None:
        blk, rng = self.blk, self.rng
        busy: list[tuple[int, int]] = []
        for _ in range(blk.depth):
            n = rng.choice(IO_SIZES)
            off = rng.randrange(0, (SPAN - n) // 4096) * 4096
            if any(o < off + n and off < o + k for o, k in busy):
                continue  # requests in flight together have no order: never overlap them
            busy.append((off, n))
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                self.shadow[off:off + n] = data
                blk.submit(VIRTIO_BLK_T_OUT, off // 512, data, token=(off, n, False))
            else:
                blk.submit(VIRTIO_BLK_T_IN, off // 512, length=n, token=(off, n, True))
        blk.kick()
        for (off, n, is_read), res in blk.wait_all():
            self.counts["block_requests"] += 1
            self.counts["block_bytes"] += n
            if res.status != VIRTIO_BLK_S_OK or (is_read and res.data != self.shadow[off:off + n]):
                self.counts["mismatches"] += 1
        if rng.random() < 0.25:
            if blk.request(VIRTIO_BLK_T_FLUSH, 0).status != VIRTIO_BLK_S_OK:
                self.counts["mismatches"] += 1
            self.counts["flushes"] += 1

    def net_turn(self) -> None:
        out = [make_frame(self.nic.mac, b"\xff" * 6, i, self.rng.randrange(60, 1515), self.rng)
               for i in range(FRAMES_PER_TURN)]
        for i, frame in enumerate(out):
            self.nic.send(frame, kick=i == len(out) - 1)
        for frame in out:
            data, self.backend_addr = self.peer.recvfrom(65536)
            self.counts["mismatches"] += data != frame
        back = [make_frame(b"\xff" * 6, self.nic.mac, i, self.rng.randrange(60, 1515), self.rng)
                for i in range(FRAMES_PER_TURN)]
        for frame in back:
            self.peer.sendto(frame, self.backend_addr)
        got = self.nic.receive(len(back))
        self.counts["mismatches"] += got[:len(back)] != back
        self.counts["frames"] += 2 * FRAMES_PER_TURN

    def console_turn(self) -> None:
        line = f"soak {self.rng.randrange(1 << 40):x}\n".encode()
        self.client.sendall(line)
        self.counts["mismatches"] += self.con.read_exact(len(line)) != line
        burst = self.rng.randbytes(CONSOLE_BURST)
        self.con.write(burst)
        got = bytearray()
        while len(got) < len(burst):
            chunk = self.client.recv(65536)
            if not chunk:
                break
            got += chunk
        self.counts["mismatches"] += bytes(got) != burst
        self.counts["console_bytes"] += len(line) + len(burst)

    # -- the run ------------------------------------------------------------------------------
    def run(self, seconds: float, interval: float, say: Any = None) -> dict[str, Any]:
        warmup = max(2.0, seconds / 10)
        t0 = time.monotonic()
        samples: list[dict[str, Any]] = []
        first = proc_figures(self.daemon.pid)
        next_sample = t0 + warmup
        while True:
            now = time.monotonic()
            if now >= next_sample:
                s = {"t": round(now - t0, 1), **proc_figures(self.daemon.pid),
                     "block_requests": self.counts["block_requests"]}
                samples.append(s)
                if say is not None:
                    say(s)
                next_sample += interval
            if now - t0 >= seconds and samples:
                break
            self.block_turn()
            self.net_turn()
            self.console_turn()
        end = {"t": round(time.monotonic() - t0, 1), **proc_figures(self.daemon.pid)}
        events = self.daemon.log_events()
        errors = [e for e in events if e.get("level") in ("error", "critical")
                  or e.get("event") == "guest_protocol_violation"]
        return {"seconds": round(end["t"], 1), "at_connect": first, "start": samples[0],
                "end": end, "samples": samples, "counts": dict(self.counts),
                "error_events": len(errors), "first_errors": errors[:5],
                "warnings": sum(1 for e in events if e.get("level") == "warning")}

    def close(self) -> int:
        try:
            self.client.close()
            self.vmm.close()
            return self.daemon.stop()
        finally:
            self.daemon.kill()
            self.peer.close()


def soak(seconds: float, interval: float = 10.0, say: Any = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vmmiod-soak-") as tmp:
        s = Soak(Path(tmp))
        try:
            s.start()
            figures = s.run(seconds, interval, say)
        finally:
            figures_exit = s.close()
        figures["daemon_exit"] = figures_exit
        return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmmiod.bench.soak", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="run length (default 10)")
    p.add_argument("--seconds", type=float, help="run length in seconds (overrides --minutes)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * args.minutes

    def say(s: dict[str, Any]) -> None:
        print(f"t={s['t']:>7}s  rss {s['rss_kib']} KiB  anon {s['rss_anon_kib']} KiB  "
              f"fds {s['fds']}  block requests {s['block_requests']}", file=sys.stderr)

    figures = soak(seconds, args.interval, say)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        st, en, c = figures["start"], figures["end"], figures["counts"]
        print(f"soak: {figures['seconds']} s; block {c['block_requests']} requests "
              f"({c['block_bytes'] >> 20} MiB, {c['flushes']} flushes), net {c['frames']} frames,"
              f" console {c['console_bytes']} bytes; mismatches {c['mismatches']}")
        print(f"  daemon RSS {st['rss_kib']} -> {en['rss_kib']} KiB (anon {st['rss_anon_kib']}"
              f" -> {en['rss_anon_kib']} KiB), fds {st['fds']} -> {en['fds']}; error events "
              f"{figures['error_events']}; exit status {figures['daemon_exit']}")
    ok = (figures["error_events"] == 0 and figures["counts"]["mismatches"] == 0
          and figures["daemon_exit"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
