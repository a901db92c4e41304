#!/usr/bin/env python3
"""Per-ping and per-segment figures from a real-Xen e2e run's netperf.jsonl (docs/e2e.md).

  tests/e2e/xen/netperf_report.py [RESULTS_DIR]      (default: $VMMIOD_E2E_RESULTS)

dom0_netperf.py wrote one snapshot per "snap" line of domU-netperf.sh; a phase is the pair
LABEL-a, LABEL-b. Each phase's counter deltas are taken net of what the two snapshot exchanges
themselves cost (the back-to-back pair cal-a, cal-b), then divided by the phase's units: pings,
block requests, frames. CPU times (vmmiod's, dom0's, the guest's) are the phase's whole, snapshot
work included: under TCG on a loaded host they also count time the emulator was not running.
The goals' ratios come from the interleaved rounds that end the guest's measurement (each round
times 100 block reads, 5 pings and one transfer each way, back to back, so a change in the
host's load falls on both sides of a ratio); the single phases' ratios are printed beside them.
Prints the table and writes netperf-summary.txt and .json beside the results.
test_xen_net_perf.py checks the same file.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

NET, BLOCK = "net0", "disk0"
GUEST = "e2e"
MSS = 1448  # TCP payload of a 1500-byte MTU frame with timestamps
PHASES = ("cal", "blk", "ping", "up", "down")


def load(results: Path) -> dict[str, dict[str, Any]]:
    snaps: dict[str, dict[str, Any]] = {}
    path = results / "netperf.jsonl"
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            snaps[rec["label"]] = rec
    return snaps


def flat(rec: dict[str, Any]) -> dict[str, float]:
    """Every counter of one snapshot under one name: guest.*, net.*, blk.*, xen.*, cpu.*."""
    out: dict[str, float] = {}
    for k, v in rec.get("guest", {}).items():
        try:
            out[f"guest.{k}"] = float(v)
        except ValueError:
            pass
    vm = rec.get("vmmiod", {})
    for dev, prefix in ((NET, "net"), (BLOCK, "blk")):
        for k, v in vm.get("devices", {}).get(dev, {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}.{k}"] = float(v)
    for k, v in vm.get("adaptor", {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"xen.{k}"] = float(v)
    tck = float(rec.get("clk_tck") or 100)
    cpu = rec.get("vmmiod_cpu", {})
    if cpu:
        out["cpu.vmmiod_ms"] = (cpu["utime"] + cpu["stime"]) * 1000 / tck
    d0 = rec.get("dom0_cpu", {})
    if d0:
        busy = sum(v for k, v in d0.items() if k not in ("idle", "iowait"))
        out["cpu.dom0_ms"] = busy * 1000 / tck
    for name, key in ((GUEST, "cpu.domU_ms"), ("Domain-0", "cpu.dom0_xen_ms")):
        if name in rec.get("domains", {}):
            out[key] = rec["domains"][name] * 1000
    for k, v in rec.get("tap", {}).items():
        out[f"tap.{k}"] = float(v)
    out["t"] = float(rec.get("t", 0))
    return out


def delta(snaps: dict[str, dict[str, Any]], phase: str) -> dict[str, float]:
    a, b = flat(snaps[f"{phase}-a"]), flat(snaps[f"{phase}-b"])
    return {k: b[k] - a[k] for k in a.keys() & b.keys()}


def figures(snaps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    missing = [f"{p}-{s}" for p in PHASES for s in "ab" if f"{p}-{s}" not in snaps]
    if missing:
        raise KeyError(f"netperf.jsonl lacks the snapshots {missing}")
    cal = delta(snaps, "cal")
    out: dict[str, Any] = {"snapshot_cost": {k: v for k, v in sorted(cal.items()) if v}}

    def net_of_cal(phase: str) -> dict[str, float]:
        # Counts only: CPU times vary too much between two snapshots to subtract one pair's.
        d = delta(snaps, phase)
        return {k: v if k.startswith("cpu.") else v - cal.get(k, 0.0) for k, v in d.items()}

    def per(d: dict[str, float], n: float, prefix: str) -> dict[str, float]:
        keys = {"ioreqs": f"{prefix}.mmio_reads", "ioreq_writes": f"{prefix}.mmio_writes",
                "kicks": f"{prefix}.notifications", "interrupts_raised": f"{prefix}.mmio_interrupts",
                "guest_irqs": "guest.net_irqs" if prefix == "net" else "guest.blk_irqs",
                "all_ioreqs": "xen.ioreqs", "loop_wakeups_evtchn": "xen.wakeups",
                "vmmiod_cpu_ms": "cpu.vmmiod_ms",
                "dom0_cpu_ms": "cpu.dom0_ms", "domU_cpu_ms": "cpu.domU_ms"}
        if prefix == "net":
            keys.update(tx_runs="net.runs_q1", rx_runs="net.runs_q0", rx_wakeups="net.rx_wakeups",
                        rx_after_tx="net.rx_after_tx")
        else:
            keys["queue_runs"] = f"{prefix}.runs_q0"
        res = {}
        for name, key in keys.items():
            if key in d and n:
                res[name] = round(d[key] / n, 2)
        if "ioreqs" in res:  # reads + writes on the device's window
            res["ioreqs"] = round(res["ioreqs"] + res.pop("ioreq_writes", 0.0), 2)
        return res

    g_blk = snaps["blk-b"]["guest"]
    blk = net_of_cal("blk")
    reqs = float(g_blk.get("requests", 0) or 0)
    blk_ms = float(g_blk.get("seconds", 0) or 0) * 1000 / reqs if reqs else 0.0
    out["block_qd1"] = {"requests": reqs, "ms_per_request": round(blk_ms, 2),
                        **per(blk, reqs, "blk")}

    g_ping = snaps["ping-b"]["guest"]
    rtts = [float(x) for x in g_ping.get("rtts_ms", "").split(",") if x]
    ping = net_of_cal("ping")
    n_ping = float(g_ping.get("pings", 0) or 0)
    out["ping"] = {"pings": n_ping, "received": len(rtts),
                   "median_ms": round(statistics.median(rtts), 2) if rtts else None,
                   "mean_ms": round(statistics.fmean(rtts), 2) if rtts else None,
                   "max_ms": max(rtts) if rtts else None, **per(ping, n_ping, "net")}

    for phase, frames_key in (("up", "guest.tx_packets"), ("down", "guest.rx_packets")):
        g = snaps[f"{phase}-b"]["guest"]
        d = net_of_cal(phase)
        nbytes = float(g.get("bytes", 0) or 0)
        secs = float(g.get("seconds", 0) or 0)
        frames = d.get(frames_key, 0.0)
        segs = nbytes / MSS
        out[phase] = {"bytes": nbytes, "seconds": secs,
                      "mbit_s": round(nbytes * 8 / secs / 1e6, 2) if secs else None,
                      "frames": frames, "bytes_per_frame": round(nbytes / frames) if frames else None,
                      "tx_frames": d.get("guest.tx_packets"), "rx_frames": d.get("guest.rx_packets"),
                      "per_frame": per(d, frames, "net"), "per_segment": per(d, segs, "net")}
    up, down = out["up"]["mbit_s"], out["down"]["mbit_s"]
    out["single_phases"] = {
        "up_over_down": round(up / down, 2) if up and down else None,
        "ping_median_over_block_ms": round(out["ping"]["median_ms"] / blk_ms, 2)
        if out["ping"]["median_ms"] and blk_ms else None}
    if "rounds-b" in snaps:  # the goals from the interleaved rounds (older runs lack them)
        r = rounds(snaps["rounds-b"]["guest"])
        out["rounds"] = r
        up, down, blk_ms = r["up_mbit_s"], r["down_mbit_s"], r["block_ms_per_request"]
        ping_median = r["ping_median_ms"]
    else:
        ping_median = out["ping"]["median_ms"]
    out["goals"] = {
        "up_over_down": round(up / down, 2) if up and down else None,
        "up_at_least_half_down": bool(up and down and up >= down / 2),
        "ping_median_over_block_ms": round(ping_median / blk_ms, 2)
        if ping_median and blk_ms else None,
        "ping_median_under_3x_block": bool(ping_median and blk_ms and ping_median < 3 * blk_ms),
        "from": "interleaved rounds" if "rounds" in out else "single phases"}
    return out


def _floats(text: str) -> list[float | None]:
    out: list[float | None] = []
    for word in text.split(","):
        try:
            out.append(float(word))
        except ValueError:  # empty, or a round marked ":short"
            out.append(None)
    return out if text else []


def rounds(g: dict[str, str]) -> dict[str, Any]:
    """The interleaved rounds of domU-netperf.sh: each round's block seconds (100 reads), pings,
    and the seconds of one NP_BYTES transfer each way. Goals over all rounds: the median ping
    against the mean block request; total bytes up over total bytes down per second (a round
    whose download came back short counts in neither direction)."""
    requests = float(g.get("requests", 100) or 100)
    nbytes = float(g.get("bytes", 0) or 0)
    blk = [x for x in _floats(g.get("blk_s", "")) if x]
    rtts = [x for x in _floats(g.get("rtts_ms", "")) if x is not None]
    pairs = [(u, d) for u, d in zip(_floats(g.get("up_s", "")), _floats(g.get("down_s", "")),
                                    strict=False) if u and d]
    up_s, down_s = sum(u for u, _ in pairs), sum(d for _, d in pairs)
    return {
        "rounds": int(float(g.get("rounds", 0) or 0)),
        "block_ms_per_request": round(sum(blk) * 1000 / (requests * len(blk)), 2) if blk else 0.0,
        "block_ms_per_round": [round(x * 1000 / requests, 2) for x in blk],
        "pings": len(rtts),
        "ping_median_ms": round(statistics.median(rtts), 2) if rtts else None,
        "up_mbit_s": round(nbytes * 8 * len(pairs) / up_s / 1e6, 2) if up_s else None,
        "down_mbit_s": round(nbytes * 8 * len(pairs) / down_s / 1e6, 2) if down_s else None,
        "transfer_rounds": len(pairs),
        "up_over_down_per_round": [round(d / u, 2) for u, d in pairs],
    }


def table(f: dict[str, Any]) -> str:
    lines = ["network figures (real Xen e2e; counts net of the snapshot exchanges, CPU ms not)"]
    b = f["block_qd1"]
    lines.append(f"  block QD1: {b['ms_per_request']} ms/request over {b['requests']:.0f}; per "
                 f"request: {_kv(b, 'requests', 'ms_per_request')}")
    p = f["ping"]
    lines.append(f"  ping: median {p['median_ms']} ms, mean {p['mean_ms']} ms, max {p['max_ms']} "
                 f"ms ({p['received']}/{p['pings']:.0f}); per ping: "
                 f"{_kv(p, 'pings', 'received', 'median_ms', 'mean_ms', 'max_ms')}")
    for phase, what in (("up", "guest->dom0"), ("down", "dom0->guest")):
        x = f[phase]
        lines.append(f"  TCP {what}: {x['mbit_s']} Mbit/s ({x['bytes']:.0f} B in {x['seconds']} s; "
                     f"{x['tx_frames']:.0f} tx / {x['rx_frames']:.0f} rx frames, "
                     f"{x['bytes_per_frame']} B per data frame)")
        lines.append(f"    per data frame: {_kv(x['per_frame'])}")
        lines.append(f"    per {MSS}-byte segment: {_kv(x['per_segment'])}")
    r = f.get("rounds")
    if r:
        lines.append(f"  interleaved rounds ({r['rounds']}): block {r['block_ms_per_request']} "
                     f"ms/request (per round {r['block_ms_per_round']}), ping median "
                     f"{r['ping_median_ms']} ms over {r['pings']}, TCP up {r['up_mbit_s']} / down "
                     f"{r['down_mbit_s']} Mbit/s (up/down per round {r['up_over_down_per_round']})")
    sp = f["single_phases"]
    lines.append(f"  single phases above: up/down {sp['up_over_down']}, ping median / block "
                 f"request {sp['ping_median_over_block_ms']}")
    g = f["goals"]
    lines.append(f"  goals ({g['from']}): up/down {g['up_over_down']} (>= 0.5: "
                 f"{g['up_at_least_half_down']}); ping median / block request "
                 f"{g['ping_median_over_block_ms']} (< 3: {g['ping_median_under_3x_block']})")
    return "\n".join(lines)


def _kv(d: dict[str, Any], *skip: str) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items() if k not in skip and not isinstance(v, dict))


def main() -> int:
    arg = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("VMMIOD_E2E_RESULTS", "")
    return report(Path(arg))


def report(results: Path) -> int:
    """Print the figures of the run in `results` (summary.py calls this) and write them."""
    if not (results / "netperf.jsonl").exists():
        print(f"netperf: no netperf.jsonl in {results}")
        return 1
    try:
        f = figures(load(results))
    except KeyError as exc:  # the guest's netperf phases did not all run
        print(f"netperf: {exc.args[0]}")
        return 1
    text = table(f)
    (results / "netperf-summary.txt").write_text(text + "\n")
    (results / "netperf-summary.json").write_text(json.dumps(f, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
