"""A real daemon (`python -m vmmiod run CONFIG`, started as systemd starts it) and the simulated
guest on the generic channel, with all three devices, for the fault, crash and soak tests.

The config is written here (like vmmiod/sim/harness.py's, but the image may live anywhere: on a
small tmpfs, on ext4 on a loop device, on a device-mapper target). `check_others()` is the
"everything else carries on" probe: a console echo both ways and a frame each way on net.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any, Self

import yaml  # type: ignore[import-untyped]

from vmmiod.sim.block import BlockDriver
from vmmiod.sim.console import ConsoleDriver, connect_console
from vmmiod.sim.harness import (
    BLOCK_BASE,
    BLOCK_IRQ,
    CONSOLE_BASE,
    CONSOLE_IRQ,
    NET_BASE,
    NET_IRQ,
    DaemonProcess,
    GuestFiles,
)
from vmmiod.sim.net import NetDriver, make_frame, udp_peer
from vmmiod.sim.vmm import SimVmm
from vmmiod.sim.vring import Allocator


def write_guest(files: GuestFiles, image: Path | str, *, net_port: int | None,
                console: bool = True, cache: str = "writeback",
                on_disconnect: str = "wait", io_engine: str | None = None) -> None:
    # The block engine: the caller's, else VMMIOD_TEST_IO_ENGINE's, else the default (auto).
    engine = io_engine or os.environ.get("VMMIOD_TEST_IO_ENGINE", "auto")
    devices: list[dict[str, Any]] = [
        {"type": "block", "id": "vda", "path": str(image), "cache": cache, "io_engine": engine,
         "mmio": {"base": BLOCK_BASE, "irq": BLOCK_IRQ}}]
    if net_port is not None:
        devices.append({"type": "net", "id": "net0", "mmio": {"base": NET_BASE, "irq": NET_IRQ},
                        "backend": {"kind": "dgram", "local": "udp:127.0.0.1:0",
                                    "remote": f"udp:127.0.0.1:{net_port}"}})
    if console:
        devices.append({"type": "console", "id": "con0",
                        "mmio": {"base": CONSOLE_BASE, "irq": CONSOLE_IRQ},
                        "backend": {"kind": "socket", "path": str(files.console)}})
    doc = {"guest": {"name": "hardening"},
           "hypervisor": {"kind": "generic", "socket": str(files.socket),
                          "on_disconnect": on_disconnect},
           "log": {"level": "info", "format": "json", "file": str(files.log),
                   "stats_interval": 0},
           "devices": devices}
    files.config.write_text(yaml.safe_dump(doc, sort_keys=False))


class DaemonGuest:
    """`with DaemonGuest(dir, image) as g:` the daemon up, the VMM connected, drivers started."""

    def __init__(self, where: Path, image: Path | str, *, cache: str = "writeback",
                 others: bool = True, on_disconnect: str = "wait") -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.files = GuestFiles(where)
        self.peer = udp_peer() if others else None
        write_guest(self.files, image, net_port=self.peer.getsockname()[1] if self.peer else None,
                    console=others, cache=cache, on_disconnect=on_disconnect)
        self.daemon = DaemonProcess(self.files)
        self.vmm: SimVmm | None = None
        self.blk: BlockDriver | None = None
        self.nic: NetDriver | None = None
        self.con: ConsoleDriver | None = None
        self.client: socket.socket | None = None
        self.backend_addr: Any = None
        self.rng = random.Random(5)

    def connect(self) -> None:
        """(Re)connect a VMM with fresh RAM and bring every device up, as a booting guest."""
        vmm = SimVmm(ram_size=64 << 20, timeout=10.0)
        self.connect_drivers(vmm, vmm.connect(self.files.socket, wait=10.0))

    def connect_drivers(self, vmm: SimVmm, server: Any) -> None:
        """Bring every announced device up on a connected VMM (fresh allocations)."""
        self.vmm = vmm
        vmm.alloc = Allocator(vmm.ram_gpa, vmm.ram_size)
        by_base = {w.base: w for w in server.windows}
        self.blk = BlockDriver(self.vmm, by_base[BLOCK_BASE], queue_size=64, depth=16)
        self.blk.start()
        if NET_BASE in by_base:
            self.nic = NetDriver(self.vmm, by_base[NET_BASE], queue_size=64)
            self.nic.start()
        if CONSOLE_BASE in by_base:
            self.con = ConsoleDriver(self.vmm, by_base[CONSOLE_BASE], queue_size=16)
            self.con.start()
            self.client = connect_console(str(self.files.console))

    def reset_alloc(self) -> None:
        assert self.vmm is not None
        self.vmm.alloc = Allocator(self.vmm.ram_gpa, self.vmm.ram_size)

    def check_others(self) -> list[str]:
        """Console echo both ways and one frame each way on net; returns what failed."""
        problems: list[str] = []
        if self.con is not None and self.client is not None:
            word = f"still here {self.rng.randrange(1 << 30)}\n".encode()
            self.client.sendall(word)
            if self.con.read_exact(len(word)) != word:
                problems.append("console: the guest did not read what the client typed")
            self.con.write(b"echo " + word)
            got = b""
            while len(got) < len(word) + 5:
                chunk = self.client.recv(4096)
                if not chunk:
                    break
                got += chunk
            if not got.endswith(b"echo " + word):
                problems.append(f"console: the client read {got[-40:]!r}")
        if self.nic is not None and self.peer is not None:
            out = make_frame(self.nic.mac, b"\xff" * 6, 1, 100, self.rng)
            self.nic.send(out)
            self.peer.settimeout(10)
            data, self.backend_addr = self.peer.recvfrom(65536)
            if data != out:
                problems.append("net: the peer got a different frame")
            back = make_frame(b"\xff" * 6, self.nic.mac, 2, 100, self.rng)
            self.peer.sendto(back, self.backend_addr)
            if self.nic.receive(1) != [back]:
                problems.append("net: the guest did not receive the peer's frame")
        return problems

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.vmm is not None:
            self.vmm.close()
            self.vmm = None
        self.blk = self.nic = self.con = None

    def stop(self) -> int:
        """The guest goes away, then the daemon's orderly stop; returns its exit status."""
        self.disconnect()
        return self.daemon.stop()

    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def problems_logged(self) -> list[dict[str, Any]]:
        return [e for e in self.daemon.log_events()
                if e.get("level") in ("critical", "exception")
                or e.get("event") in ("guest_protocol_violation", "window_error")]

    def __enter__(self) -> Self:
        self.daemon.start()
        try:
            self.connect()
        except BaseException:
            self.daemon.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.disconnect()
        finally:
            self.daemon.kill()
            if self.peer is not None:
                self.peer.close()
