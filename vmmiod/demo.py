"""`vmmiod demo`: a real daemon and a simulated guest on temporary files, in a few seconds.

The daemon runs as it would under systemd (`python -m vmmiod run guest.yaml`, generic IOREQ
channel, `on_disconnect: exit`); the simulated guest connects as a VMM, probes its three
devices the way Linux does and runs a short workload on each: block I/O verified byte for byte,
Ethernet frames through the dgram backend to a UDP socket of ours and back, console echo and
bulk transfer through the socket backend. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmmiod import __version__
from vmmiod.sim.guest import run_guest
from vmmiod.sim.harness import DaemonError, DaemonProcess, GuestFiles, write_config
from vmmiod.sim.net import udp_peer
from vmmiod.sim.vmm import SimError, SimVmm

PROTOCOL_VIOLATION_EVENTS = ("guest_protocol_violation", "window_error", "vmm_refused")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmmiod demo", description=(
        "Start a vmmiod daemon and a simulated guest (block, net, console) on temporary files, "
        "run a short workload on each device and print what happened."))
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    p.add_argument("--quick", action="store_true", help="smaller workloads")
    p.add_argument("--keep", action="store_true",
                   help="keep the disk image too (the config and the daemon log are always kept)")
    p.add_argument("--dir", type=Path, help="work in this folder instead of a temporary one")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    work = args.dir or Path(tempfile.mkdtemp(prefix="vmmiod-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    show = (lambda kind, text: None) if args.json else _progress
    result = run_demo(work, quick=args.quick, progress=show)
    # The config and the daemon's log stay for the reader; the image only when asked or
    # when something failed (it is the evidence).
    keep = args.keep or args.dir is not None or not result["ok"]
    if not keep:
        for name in ("disk.img", "daemon.stderr"):
            (work / name).unlink(missing_ok=True)
    result["kept_image"] = keep
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_summary(result)
    return 0 if result["ok"] else 1


def _progress(kind: str, text: str) -> None:
    print(f"  [{kind:>7}] {text}", flush=True)


def run_demo(work: Path, *, quick: bool = False, progress: Any = None) -> dict[str, Any]:
    say = progress or (lambda kind, text: None)
    t0 = time.perf_counter()
    files = GuestFiles(work, image_size=(16 << 20) if quick else (32 << 20))
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    result: dict[str, Any] = {"version": __version__, "dir": str(work),
                              "config": str(files.config), "log": str(files.log)}
    peer = udp_peer()
    try:
        write_config(files, net_peer_port=peer.getsockname()[1])
        say("daemon", f"starting: {sys.executable} -m vmmiod run {files.config}")
        daemon = DaemonProcess(files)
        try:
            daemon.start()
        except DaemonError as exc:
            check("daemon_started", False, str(exc))
            return _finish(result, checks, {}, t0)
        check("daemon_started", True, f"pid {daemon.pid}")
        devices: dict[str, Any] = {}
        try:
            with SimVmm() as vmm:
                server = vmm.connect(files.socket)
                say("guest", f"connected: {len(server.windows)} windows, "
                             f"{vmm.ram_size >> 20} MiB RAM in a memfd, 1 vCPU")
                devices = run_guest(vmm, image_path=str(files.image),
                                    console_path=str(files.console), net_peer=peer,
                                    quick=quick, progress=say)
                result["ioreqs"] = vmm.ioreqs
            cpu = daemon.cpu_seconds()
            status = daemon.wait()  # on_disconnect: exit
            check("daemon_exit_status", status == 0, f"exit status {status}")
            result["daemon_cpu_seconds"] = round(cpu, 3)
        except (SimError, OSError) as exc:
            check("guest_ran", False, f"{type(exc).__name__}: {exc}")
        finally:
            daemon.kill()
        for kind in ("block", "net", "console"):
            res = devices.get(kind)
            check(f"{kind}_workload", bool(res and res["ok"]),
                  "; ".join(res["failures"][:3]) if res else "device not found")
        events = daemon.log_events()
        bad = [e for e in events if e.get("event") in PROTOCOL_VIOLATION_EVENTS
               or e.get("level") in ("error", "critical")]
        check("daemon_log_clean", not bad,
              "; ".join(f"{e.get('event')}" for e in bad[:5]) or f"{len(events)} records")
        reset = {e.get("device") for e in events if e.get("event") == "device_reset"}
        check("devices_reset_on_disconnect", {"vda", "net0", "con0"} <= reset,
              f"reset: {sorted(x for x in reset if x)}")
        return _finish(result, checks, devices, t0)
    finally:
        peer.close()


def _finish(result: dict[str, Any], checks: list[dict[str, Any]], devices: dict[str, Any],
            t0: float) -> dict[str, Any]:
    result["devices"] = devices
    result["checks"] = checks
    result["ok"] = bool(checks) and all(c["ok"] for c in checks)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def print_summary(r: dict[str, Any]) -> None:
    print()
    print(f"vmmiod {r['version']} demo: {'PASSED' if r['ok'] else 'FAILED'} in {r['seconds']} s")
    d = r.get("devices", {})
    if "block" in d and "requests" in d["block"]:
        b = d["block"]
        print(f"  block   {b['capacity_sectors'] * 512 >> 20} MiB, serial {b['serial']!r}: "
              f"{b['requests']} requests, {b['bytes_written'] >> 20} MiB written, "
              f"{b['bytes_read'] >> 20} MiB read and verified")
        print(f"          features {' '.join(b['features'])}")
    if "net" in d and "tx_frames" in d["net"]:
        n = d["net"]
        print(f"  net     mac {n['mac']}, mtu {n['mtu']}: {n['tx_frames']} frames out "
              f"({n['tx_frames_per_s']}/s), {n['rx_frames']} in ({n['rx_frames_per_s']}/s)")
        print(f"          features {' '.join(n['features'])}")
    if "console" in d and "echoes" in d["console"]:
        c = d["console"]
        print(f"  console {c['cols']}x{c['rows']}: {c['echoes']} echoes "
              f"({c['echo_round_trip_ms']} ms each), {c['bulk_bytes_each_way'] >> 10} KiB each "
              f"way ({c['bulk_mb_per_s']} MB/s)")
        print(f"          features {' '.join(c['features'])}")
    if "ioreqs" in r:
        print(f"  channel {r['ioreqs']} IOREQs; daemon CPU {r.get('daemon_cpu_seconds', '?')} s")
    for c in r["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}" + (f": {c['detail']}"
                                                                  if not c["ok"] else ""))
    print(f"  config {r['config']}\n  log    {r['log']} (JSON lines)")


if __name__ == "__main__":
    raise SystemExit(main())
