"""A real daemon (`python -m vmmiod run CONFIG`) in a child process, for the demo and benchmarks.

The daemon is started the way systemd starts it, from a YAML file written here; its CPU time is
read from /proc/<pid>/stat (utime + stime), so benchmarks can charge each request its share of
daemon CPU without any extra dependency.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import yaml

BLOCK_BASE, BLOCK_IRQ = 0x0200_0000, 33
NET_BASE, NET_IRQ = 0x0200_0200, 34
CONSOLE_BASE, CONSOLE_IRQ = 0x0200_0400, 35
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class GuestFiles:
    """Where one simulated guest's pieces live (all under `dir`)."""

    dir: Path
    image_size: int = 32 << 20

    @property
    def config(self) -> Path:
        return self.dir / "guest.yaml"

    @property
    def socket(self) -> Path:
        return self.dir / "vmm.sock"

    @property
    def image(self) -> Path:
        return self.dir / "disk.img"

    @property
    def console(self) -> Path:
        return self.dir / "console.sock"

    @property
    def log(self) -> Path:
        return self.dir / "daemon.log"


def write_config(files: GuestFiles, *, net_peer_port: int | None, block: bool = True,
                 console: bool = True, on_disconnect: str = "exit",
                 level: str = "info", cache: str = "writeback") -> dict[str, Any]:
    """Write the guest's YAML (and a sparse disk image); returns the document written."""
    devices: list[dict[str, Any]] = []
    if block:
        with open(files.image, "ab") as f:
            f.truncate(files.image_size)
        devices.append({"type": "block", "id": "vda", "path": str(files.image), "cache": cache,
                        "mmio": {"base": BLOCK_BASE, "irq": BLOCK_IRQ}})
    if net_peer_port is not None:
        devices.append({"type": "net", "id": "net0",
                        "mmio": {"base": NET_BASE, "irq": NET_IRQ},
                        "backend": {"kind": "dgram", "local": "udp:127.0.0.1:0",
                                    "remote": f"udp:127.0.0.1:{net_peer_port}"}})
    if console:
        devices.append({"type": "console", "id": "con0",
                        "mmio": {"base": CONSOLE_BASE, "irq": CONSOLE_IRQ},
                        "backend": {"kind": "socket", "path": str(files.console)}})
    doc = {"guest": {"name": "demo"},
           "hypervisor": {"kind": "generic", "socket": str(files.socket),
                          "on_disconnect": on_disconnect},
           "log": {"level": level, "format": "json", "file": str(files.log),
                   "stats_interval": 0},
           "devices": devices}
    files.config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return doc


class DaemonError(Exception):
    """The daemon did not come up (its exit status and log tell why)."""


class DaemonProcess:
    """`python -m vmmiod run CONFIG` as a child; stderr (if any) goes next to its log."""

    def __init__(self, files: GuestFiles) -> None:
        self.files = files
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr = files.dir / "daemon.stderr"
        self._notify: socket.socket | None = None  # kept, as systemd keeps it, until the end

    def start(self, timeout: float = 15.0) -> Self:
        """Start it as systemd would (Type=notify) and return once it sent READY=1."""
        self._close_notify()  # a daemon started again on the same object
        notify_path = self.files.dir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        ready = False
        try:
            notify.bind(str(notify_path))
            # RUNTIME_DIRECTORY as systemd gives it: the device state record lives there.
            env = {**os.environ, "NOTIFY_SOCKET": str(notify_path),
                   "RUNTIME_DIRECTORY": str(self.files.dir)}
            with open(self._stderr, "wb") as err:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "vmmiod", "run", str(self.files.config)],
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                    start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise DaemonError(f"the daemon exited with status {self.proc.returncode}: "
                                      f"{self.why()}")
                notify.settimeout(0.05)
                try:
                    if b"READY=1" in notify.recv(4096).split(b"\n"):
                        ready = True
                        self._notify = notify  # STOPPING=1 and the rest still arrive
                        return self
                except TimeoutError:
                    pass
            self.kill()
            raise DaemonError(f"the daemon did not report READY=1 within {timeout} s")
        finally:
            if not ready:
                notify.close()
                notify_path.unlink(missing_ok=True)

    def _close_notify(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None
            (self.files.dir / "notify.sock").unlink(missing_ok=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU of the daemon so far (all its threads)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DaemonError(f"the daemon did not exit within {timeout} s") from None
        self._close_notify()
        return status

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: the daemon's orderly stop."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_notify()

    def why(self) -> str:
        """The daemon's own words on a failure: its last error record, else its stderr."""
        errors = [e for e in self.log_events() if e.get("level") in ("error", "critical")]
        if errors:
            e = errors[-1]
            return f"{e.get('event')}: {e.get('message', '')}".strip()
        return self.stderr_tail() or "(nothing logged)"

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            return self._stderr.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log records so far."""
        out: list[dict[str, Any]] = []
        try:
            text = self.files.log.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
