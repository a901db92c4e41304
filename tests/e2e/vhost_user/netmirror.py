"""The net side by side of the vhost-user e2e run (docs/e2e.md): the same guest sends the same
traffic through two vhost-user-net back-ends that mirror it, Debian's dpdk-testpmd (vhost PMD,
`--forward-mode=5tswap`) and vmmiod (its net device, dgram backend, with a small peer process
that does what 5tswap does), and the figures of both.

A mirror sends every frame back with its Ethernet, IPv4/IPv6 and TCP/UDP source and
destination swapped (checksums stay valid: the sums do not depend on the order). A guest ping
to the far address (a static ARP entry: nobody answers ARP) comes back as an echo request from
that address, which the guest's kernel answers; the answer comes back as the echo reply the
ping waits for. So one ping crosses the mirror twice each way.

testpmd busy-polls one host CPU: it runs while QEMU connects and the guest probes its NIC (QEMU
waits for the back-end's answers then), is stopped (SIGSTOP) from the guest's first line on,
resumed (SIGCONT) only for its own rounds, and ends (its stdin closed) after the last one.

  python3 netmirror.py peer PATH    the swapping peer on a Unix datagram socket bound at PATH
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import testpmd
from procs import CLK_TCK, STOP_WAIT, Proc, cpu_ticks

BACKENDS = ("testpmd", "vmmiod")
PEER_SEND_TIMEOUT = 1.0  # seconds the peer waits for room in vmmiod's socket before dropping


# -- the swap, and the peer that does it for vmmiod --------------------------------------------
def swap5(frame: bytes) -> bytes:
    """What testpmd's 5tswap does to a frame: MAC source <-> destination (VLAN tags skipped);
    for IPv4 and IPv6 the addresses; for TCP and UDP the ports. Anything else: MACs only."""
    f = bytearray(frame)
    if len(f) < 14:
        return bytes(f)
    f[0:6], f[6:12] = f[6:12], f[0:6]
    ethertype, off = int.from_bytes(f[12:14], "big"), 14
    while ethertype in (0x8100, 0x88A8) and len(f) >= off + 4:
        ethertype, off = int.from_bytes(f[off + 2:off + 4], "big"), off + 4
    if ethertype == 0x0800 and len(f) >= off + 20:
        f[off + 12:off + 16], f[off + 16:off + 20] = f[off + 16:off + 20], f[off + 12:off + 16]
        proto, l4 = f[off + 9], off + (f[off] & 0x0F) * 4
    elif ethertype == 0x86DD and len(f) >= off + 40:
        f[off + 8:off + 24], f[off + 24:off + 40] = f[off + 24:off + 40], f[off + 8:off + 24]
        proto, l4 = f[off + 6], off + 40
    else:
        return bytes(f)
    if proto in (6, 17) and len(f) >= l4 + 4:
        f[l4:l4 + 2], f[l4 + 2:l4 + 4] = f[l4 + 2:l4 + 4], f[l4:l4 + 2]
    return bytes(f)


def peer_main(path: str) -> int:
    """Answer every datagram (one frame, vmmiod's dgram framing) to its sender, swapped. Exits
    0 on SIGTERM; a sender without room for the answer within PEER_SEND_TIMEOUT loses it."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Path(path).unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    frames = dropped = 0
    while not stop.is_set():
        try:
            data, sender = sock.recvfrom(65536)
        except (TimeoutError, InterruptedError):
            continue
        if not sender:
            continue
        frames += 1
        sock.settimeout(PEER_SEND_TIMEOUT)
        try:
            sock.sendto(swap5(data), sender)
        except OSError:
            dropped += 1
        sock.settimeout(0.5)
    print(json.dumps({"event": "peer_stopped", "frames": frames, "dropped": dropped}),
          flush=True)
    sock.close()
    Path(path).unlink(missing_ok=True)
    return 0


# -- the host side of the rounds ----------------------------------------------------------------
class Testpmd(Proc):
    """testpmd: ends when its stdin closes (not interactive: it waits for a line on stdin)."""

    def pause(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.popen is None or "rc" in self.history[-1]:
            return
        self.expected_exit = True
        self.resume()
        if self.popen.stdin is not None:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        try:
            rc, how = self.popen.wait(timeout=STOP_WAIT), "stdin closed"
        except subprocess.TimeoutExpired:
            self.popen.kill()
            rc, how = self.popen.wait(), f"SIGKILL: still running {STOP_WAIT}s after stdin closed"
        self.history[-1].update(ended=time.monotonic(), rc=rc, how=how)


class Mirror:
    """testpmd and vmmiod's peer, and the CPU samples of the guest's `E2E-N` rounds."""

    def __init__(self, results: Path, info: dict[str, Any], lcores: str, sock: Path,
                 peer_path: Path, python: str, in_ns: Any) -> None:
        cmd, env = testpmd.command(info, sock, lcores)
        self.testpmd = Testpmd("dpdk-testpmd", in_ns(cmd), results / "testpmd.log", [sock],
                               env=env, stdin_pipe=True)
        self.peer = Proc("mirror peer", [python, str(Path(__file__)), "peer", str(peer_path)],
                         results / "mirror-peer.log", [peer_path])
        self.samples: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def procs(self) -> dict[str, Proc]:
        return {"mirror-peer": self.peer, "testpmd": self.testpmd}

    def on_line(self, text: str, dut: Proc) -> None:
        """The guest's `E2E-N idle | start be=B round=N | end be=B round=N | done` lines."""
        if text.startswith("E2E-N idle"):
            self.testpmd.pause()
        elif text.startswith("E2E-N done"):
            self.testpmd.stop()
        elif m := re.match(r"E2E-N (start|end) be=(\S+) round=(\d+)", text):
            edge, be, rnd = m.group(1), m.group(2), int(m.group(3))
            if edge == "start" and be == "testpmd":
                self.testpmd.resume()
            proc = self.testpmd if be == "testpmd" else dut
            ticks = cpu_ticks(proc.pid) if proc.pid else None
            peer = cpu_ticks(self.peer.pid) if self.peer.pid else None
            with self.lock:
                s = self.samples.setdefault(f"{be}/{rnd}", {"pid": proc.pid})
                s[edge], s[f"peer_{edge}"], s[f"t_{edge}"] = ticks, peer, time.monotonic()
            if edge == "end" and be == "testpmd":
                self.testpmd.pause()


# -- figures --------------------------------------------------------------------------------------
def _guest_lines(results: Path) -> list[tuple[str, dict[str, str]]]:
    try:
        lines = json.loads((results / "timeline.json").read_text())["lines"]
    except (OSError, ValueError, KeyError):
        return []
    out = []
    for entry in lines:
        if m := re.match(r"E2E-R (mirror|burst|mirror-round) (.*)", str(entry["line"])):
            out.append((m.group(1), dict(re.findall(r"(\S+?)=(\S*)", m.group(2)))))
    return out


def _fio_burst(path: Path) -> tuple[int, int] | None:
    """(datagrams sent, runtime ms) of one burst; None when missing or failed."""
    try:
        job = json.loads(path.read_text())["jobs"][0]
        return (None if job.get("error") else
                (int(job["write"]["total_ios"]), int(job["write"]["runtime"])))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _ratio(v: float | None, q: float | None, digits: int = 2) -> float | None:
    return round(v / q, digits) if v is not None and q else None


def net_figures(results: Path) -> dict[str, Any]:
    """Per back-end over all its rounds: pings sent/received and RTT (ms; mean of the rounds'
    averages weighted by replies, min, max) at 56 and 1400 bytes; the burst's frames per second
    (frames the guest got back / fio's send time); CPU per mirrored frame (the back-end's
    utime+stime over its rounds / the frames the guest got back in them) and CPU / wall time;
    for vmmiod also its peer's CPU. Ratios vmmiod / testpmd."""
    try:
        cpu = json.loads((results / "cpu.json").read_text())
    except (OSError, ValueError):
        cpu = {}
    samples, clk = cpu.get("net_samples", {}), cpu.get("clk_tck", CLK_TCK)
    lines = _guest_lines(results)
    out: dict[str, Any] = {}
    for be in BACKENDS:
        mine = [(kind, kv) for kind, kv in lines if kv.get("be") == be]
        if not mine:
            out[be] = None
            continue
        row: dict[str, Any] = {"rounds": len({kv.get("round") for _, kv in mine})}
        for size in ("56", "1400"):
            pings = [kv for kind, kv in mine if kind == "mirror" and kv.get("size") == size]
            sent = sum(int(kv.get("sent") or 0) for kv in pings)
            got = sum(int(kv.get("received") or 0) for kv in pings)
            rtts = [(int(kv.get("received") or 0), [float(x) for x in kv["rtt"].split("/")])
                    for kv in pings if re.fullmatch(r"[\d.]+/[\d.]+/[\d.]+", kv.get("rtt", ""))]
            row[f"ping{size}"] = {
                "sent": sent, "received": got,
                "rtt_ms": round(sum(n * r[1] for n, r in rtts) / got, 3) if rtts and got else None,
                "rtt_min_ms": min((r[0] for _, r in rtts), default=None),
                "rtt_max_ms": max((r[2] for _, r in rtts), default=None),
                "round_rtt_ms": [r[1] for _, r in rtts]}
        bursts = [kv for kind, kv in mine if kind == "burst"]
        sent = ms = rx = 0
        round_fps = []
        for kv in bursts:
            fio = _fio_burst(results / f"netburst-{be}-r{kv.get('round')}.json")
            if fio is None or kv.get("rc") != "0" or not fio[1]:
                continue
            sent, ms, rx = sent + fio[0], ms + fio[1], rx + int(kv.get("rx") or 0)
            round_fps.append(round(int(kv.get("rx") or 0) * 1000 / fio[1]))
        row["burst"] = {"rounds": len(round_fps), "datagrams_sent": sent, "frames_back": rx,
                        "send_ms": ms, "round_frames_per_second": round_fps,
                        "frames_per_second": round(rx * 1000 / ms) if ms else None,
                        "sent_per_second": round(sent * 1000 / ms) if ms else None}
        frames = ticks = peer = 0
        wall = 0.0
        for kv in (kv for kind, kv in mine if kind == "mirror-round"):
            s = samples.get(f"{be}/{kv.get('round')}", {})
            if s.get("start") is None or s.get("end") is None:
                continue
            frames += int(kv.get("rx") or 0)
            ticks += s["end"] - s["start"]
            wall += s["t_end"] - s["t_start"]
            if s.get("peer_start") is not None and s.get("peer_end") is not None:
                peer += s["peer_end"] - s["peer_start"]
        row["cpu"] = {"frames": frames, "cpu_seconds": ticks / clk, "wall_seconds": round(wall, 2),
                      "cpu_us_per_frame": round(ticks / clk * 1e6 / frames, 1) if frames else None,
                      "cpu_per_wall": round(ticks / clk / wall, 2) if wall else None}
        if be == "vmmiod":
            row["cpu"]["peer_us_per_frame"] = round(peer / clk * 1e6 / frames, 1) \
                if frames else None
        out[be] = row
    t, v = out.get("testpmd"), out.get("vmmiod")
    if t and v:
        out["ratios"] = {
            "rtt56": _ratio(v["ping56"]["rtt_ms"], t["ping56"]["rtt_ms"]),
            "rtt1400": _ratio(v["ping1400"]["rtt_ms"], t["ping1400"]["rtt_ms"]),
            "frames_per_second": _ratio(v["burst"]["frames_per_second"],
                                        t["burst"]["frames_per_second"], 3),
            "cpu_per_frame": _ratio(v["cpu"]["cpu_us_per_frame"], t["cpu"]["cpu_us_per_frame"]),
            "round_frames_per_second": [
                _ratio(a, b, 3) for a, b in zip(v["burst"]["round_frames_per_second"],
                                                t["burst"]["round_frames_per_second"])]}
    return out


def net_table(fig: dict[str, Any]) -> str:
    head = (f"{'backend':<8} {'ping56 ms':>9} {'ping1400 ms':>11} {'replies':>9} "
            f"{'burst frames/s':>14} {'sent/s':>7} {'CPU us/frame':>12} {'CPU/wall':>8}")
    lines = ["net side by side (guest -> mirror -> guest; testpmd 5tswap vs vmmiod dgram + peer)",
             head]
    for be in BACKENDS:
        r = fig.get(be)
        if not r:
            lines.append(f"{be:<8} -")
            continue
        got = r["ping56"]["received"] + r["ping1400"]["received"]
        sent = r["ping56"]["sent"] + r["ping1400"]["sent"]
        lines.append(f"{be:<8} {r['ping56']['rtt_ms']!s:>9} {r['ping1400']['rtt_ms']!s:>11} "
                     f"{f'{got}/{sent}':>9} {r['burst']['frames_per_second']!s:>14} "
                     f"{r['burst']['sent_per_second']!s:>7} "
                     f"{r['cpu']['cpu_us_per_frame']!s:>12} {r['cpu']['cpu_per_wall']!s:>8}")
    if ratios := fig.get("ratios"):
        each = " ".join(f"{x:.2f}" for x in ratios["round_frames_per_second"] if x is not None)
        lines.append(f"vmmiod/testpmd: RTT {ratios['rtt56']} (56 B), {ratios['rtt1400']} "
                     f"(1400 B); frames/s {ratios['frames_per_second']} (rounds: {each or '-'}); "
                     f"CPU per frame {ratios['cpu_per_frame']}")
    v = fig.get("vmmiod") or {}
    if v.get("cpu", {}).get("peer_us_per_frame") is not None:
        lines.append(f"vmmiod's peer (the swap, outside vmmiod): "
                     f"{v['cpu']['peer_us_per_frame']} us/frame")
    lines.append("testpmd busy-polls one host CPU while it runs (CPU/wall ~1): its CPU per frame "
                 "is its poll loop's time over the frames it mirrored, not a cost per frame")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "peer":
        raise SystemExit(peer_main(sys.argv[2]))
    raise SystemExit(__doc__)
