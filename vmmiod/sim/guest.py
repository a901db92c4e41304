"""The simulated guest as a whole: probe every window the daemon announced, bind a driver to
each device found, run each device's workload, and report what was negotiated and what moved.

Shared by `vmmiod demo`, `python -m vmmiod.sim` and the benchmarks.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from vmmiod.hypervisors.generic.protocol import Window
from vmmiod.sim.block import VIRTIO_ID_BLOCK, BlockDriver, run_block_workload
from vmmiod.sim.console import (
    VIRTIO_ID_CONSOLE,
    ConsoleDriver,
    connect_console,
    run_console_workload,
)
from vmmiod.sim.net import VIRTIO_ID_NET, NetDriver, run_net_workload
from vmmiod.sim.virtio_mmio import VirtioMmioDriver
from vmmiod.sim.vmm import SimError, SimVmm

DEVICE_NAMES = {VIRTIO_ID_NET: "net", VIRTIO_ID_BLOCK: "block", VIRTIO_ID_CONSOLE: "console"}
FEATURE_NAMES = {
    "common": {28: "INDIRECT_DESC", 29: "EVENT_IDX", 32: "VERSION_1", 33: "ACCESS_PLATFORM"},
    "block": {1: "SIZE_MAX", 2: "SEG_MAX", 4: "GEOMETRY", 5: "RO", 6: "BLK_SIZE", 9: "FLUSH",
              10: "TOPOLOGY"},
    "net": {3: "MTU", 5: "MAC", 16: "STATUS"},
    "console": {0: "SIZE", 1: "MULTIPORT", 2: "EMERG_WRITE"},
}

Progress = Callable[[str, str], None]


def feature_names(kind: str, features: int) -> list[str]:
    names = {**FEATURE_NAMES["common"], **FEATURE_NAMES.get(kind, {})}
    return [names.get(b, f"bit{b}") for b in range(64) if features >> b & 1]


def probe_windows(vmm: SimVmm) -> dict[str, Window]:
    """Device kind -> window, for every announced window that holds a device we drive."""
    assert vmm.server is not None
    found: dict[str, Window] = {}
    for w in vmm.server.windows:
        kind = DEVICE_NAMES.get(VirtioMmioDriver(vmm, w).probe())
        if kind is not None and kind not in found:
            found[kind] = w
    return found


def run_guest(vmm: SimVmm, *, image_path: str | None = None, console_path: str | None = None,
              net_peer: socket.socket | None = None, quick: bool = False,
              progress: Progress | None = None) -> dict[str, Any]:
    """Every device's workload; each result has `ok`, `failures` and figures."""
    say = progress or (lambda kind, text: None)
    results: dict[str, Any] = {}
    windows = probe_windows(vmm)
    for kind, window in windows.items():
        t0 = time.perf_counter()
        say(kind, f"probing the device at {window.base:#x} (irq {window.irq})")
        try:
            res = _run_one(vmm, kind, window, image_path, console_path, net_peer, quick, say)
        except (SimError, OSError) as exc:
            res = {"failures": [f"{type(exc).__name__}: {exc}"]}
        res["window"] = {"base": window.base, "irq": window.irq}
        res["ok"] = not res["failures"]
        res["wall_seconds"] = round(time.perf_counter() - t0, 3)
        say(kind, f"skipped: {res['skipped']}" if "skipped" in res else
            "passed" if res["ok"] else f"FAILED: {res['failures'][0]}")
        results[kind] = res
    return results


def _run_one(vmm: SimVmm, kind: str, window: Window, image_path: str | None,
             console_path: str | None, net_peer: socket.socket | None, quick: bool,
             say: Progress) -> dict[str, Any]:
    if kind == "block":
        blk = BlockDriver(vmm, window)
        blk.start()
        say(kind, f"{blk.capacity * 512 >> 20} MiB disk; sequential and random I/O, "
                  f"every byte verified")
        res = run_block_workload(blk, span=(2 << 20) if quick else (8 << 20),
                                 random_ops=100 if quick else 400, image_path=image_path)
        features = blk.features
        blk.stop()
    elif kind == "net":
        if net_peer is None:
            return {"failures": [], "skipped": "no peer socket for the dgram backend"}
        nic = NetDriver(vmm, window)
        nic.start()
        say(kind, f"mac {':'.join(f'{b:02x}' for b in nic.mac)}; frames to and from the backend")
        res = run_net_workload(nic, net_peer, frames=200 if quick else 1000)
        features = nic.features
        nic.stop()
    else:
        if console_path is None:
            return {"failures": [], "skipped": "no console socket"}
        con = ConsoleDriver(vmm, window)
        con.start()
        say(kind, "echo and bulk transfer through the socket backend")
        with connect_console(console_path) as client:
            res = run_console_workload(con, client, echoes=10 if quick else 50,
                                       bulk=(64 << 10) if quick else (1 << 20))
        features = con.features
        con.stop()
    res["features"] = feature_names(kind, features)
    return res
