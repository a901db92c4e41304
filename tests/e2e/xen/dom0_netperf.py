"""dom0's side of the network measurement (domU-netperf.sh is the guest's side; docs/e2e.md).

The guest opens TCP 5003 and sends one line, "snap LABEL key=value...", before and after each
phase (a 20-ping run, a bounded TCP transfer each way, block reads at queue depth 1). For each
line this takes a snapshot of everything that counts the phase from outside the guest:
- vmmiod's counters: SIGUSR1 makes the daemon log one `device_stats` record per device (with
  its window's `mmio_*` register accesses) and one `adaptor_stats` record (wake-ups, events,
  IOREQs, interrupts); they are read back from the daemon's log;
- the daemon's CPU time (/proc/PID/stat), dom0's CPU time (/proc/stat), every domain's CPU
  time (`xl list`), the TAP's counters (/sys/class/net/TAP/statistics);
then appends {"label", "guest": {the line's key=values}, "t", ...} as one JSON line to --out
and answers "ok". netperf_report.py turns pairs of snapshots into per-ping and per-segment
figures. The vmmiod instance is the process holding /dev/net/tun open (whoever started it).
Bounded: exits after --lifetime seconds at the latest.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any

PORT = 5003
STATS_WAIT = 30.0  # seconds for the daemon's records to appear in its log


def _fds(pid: str) -> list[str]:
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    except OSError:
        pass
    return out


def find_daemon() -> tuple[int, str] | None:
    """(pid, log path) of the vmmiod instance serving the TAP (newest if several)."""
    best: tuple[float, int, str] | None = None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                start = float(f.read().rsplit(")", 1)[1].split()[19])
        except (OSError, IndexError, ValueError):
            continue
        if b"vmmiod" not in cmd:
            continue
        fds = _fds(pid)
        if "/dev/net/tun" not in fds:
            continue
        log = _stderr(pid) or next((p for p in fds if p.endswith(".log")), "")
        if best is None or start > best[0]:
            best = (start, int(pid), log)
    return (best[1], best[2]) if best else None


def _stderr(pid: str) -> str:
    try:
        path = os.readlink(f"/proc/{pid}/fd/2")
    except OSError:
        return ""
    return path if os.path.isfile(path) else ""


def cpu_ticks(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return {"utime": int(fields[11]), "stime": int(fields[12])}
    except (OSError, IndexError, ValueError):
        return {}


def dom0_cpu() -> dict[str, int]:
    with open("/proc/stat") as f:
        words = f.readline().split()
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    return {n: int(v) for n, v in zip(names, words[1:], strict=False)}


def domain_seconds() -> dict[str, float]:
    """CPU seconds per domain from `xl list` (0.1 s resolution)."""
    try:
        text = subprocess.run(["xl", "list"], capture_output=True, text=True, timeout=20,
                              check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in text.splitlines()[1:]:
        words = line.split()
        if len(words) >= 6:
            try:
                out[words[0]] = float(words[-1])
            except ValueError:
                pass
    return out


def tap_counters(ifname: str) -> dict[str, int]:
    out = {}
    base = f"/sys/class/net/{ifname}/statistics"
    for name in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_dropped", "tx_dropped"):
        try:
            with open(f"{base}/{name}") as f:
                out[name] = int(f.read())
        except (OSError, ValueError):
            pass
    return out


def daemon_counters(pid: int, log: str) -> dict[str, Any]:
    """SIGUSR1, then the records it logged: {"devices": {id: record}, "adaptor": record}."""
    if not log:
        return {"error": "daemon log not found"}
    start = os.path.getsize(log)
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as exc:
        return {"error": f"SIGUSR1: {exc}"}
    deadline = time.monotonic() + STATS_WAIT
    devices: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "device_stats" and not rec.get("final"):
                devices[rec.get("device", "?")] = rec
            elif rec.get("event") == "adaptor_stats" and not rec.get("final"):
                return {"devices": devices, "adaptor": rec}  # logged after the devices
        time.sleep(0.05)
    return {"devices": devices, "error": "no adaptor_stats record after SIGUSR1"}


_found: list[tuple[int, str]] = []


def daemon() -> tuple[int, str] | None:
    """find_daemon(), remembered while that process lives (a /proc scan is slow under TCG)."""
    if _found and os.path.exists(f"/proc/{_found[0][0]}") \
            and "/dev/net/tun" in _fds(str(_found[0][0])):
        return _found[0]
    found = find_daemon()
    _found[:] = [found] if found else []
    return found


def snapshot(label: str, guest: dict[str, str], tap: str) -> dict[str, Any]:
    t = time.monotonic()
    found = daemon()
    rec: dict[str, Any] = {"label": label, "guest": guest, "t": round(t, 4), "tap": tap_counters(tap),
                           "dom0_cpu": dom0_cpu(), "clk_tck": os.sysconf("SC_CLK_TCK")}
    if found is None:
        rec["error"] = "no vmmiod process holds /dev/net/tun"
    else:
        pid, log = found
        rec.update(pid=pid, log=log, vmmiod_cpu=cpu_ticks(pid))
        rec["vmmiod"] = daemon_counters(pid, log)
    rec["t_counters"] = round(time.monotonic(), 4)
    rec["domains"] = domain_seconds()
    rec["t_done"] = round(time.monotonic(), 4)
    return rec


def serve(srv: socket.socket, out: str, tap: str) -> None:
    while True:
        conn, _ = srv.accept()
        conn.settimeout(60)
        try:
            line = b""
            while b"\n" not in line and len(line) < 8192:
                data = conn.recv(4096)
                if not data:
                    break
                line += data
            words = line.decode(errors="replace").split()
            if len(words) >= 2 and words[0] == "snap":
                guest = dict(w.split("=", 1) for w in words[2:] if "=" in w)
                rec = snapshot(words[1], guest, tap)
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                conn.sendall(b"ok\n")
            else:
                conn.sendall(b"?\n")
        except (OSError, ValueError) as exc:
            with open(out, "a") as f:
                f.write(json.dumps({"label": "error", "error": repr(exc)}) + "\n")
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tap", required=True)
    ap.add_argument("--lifetime", type=float, default=900)
    args = ap.parse_args()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", PORT))
    srv.listen(4)
    threading.Thread(target=serve, args=(srv, args.out, args.tap), daemon=True).start()
    time.sleep(args.lifetime)


if __name__ == "__main__":
    main()
