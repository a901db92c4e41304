"""A whole guest against the daemon's serving half in a thread of this process.

The devices (block on an image, net on dgram with a peer socket, console on a Unix socket)
are real, the channel is the generic IOREQ channel, the guest is the simulated guest
(vmmiod/sim/) with its Linux-like drivers. Used where the test needs /proc/self figures (fds,
mappings) or the daemon's asyncio tasks, which a child process would hide.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any, Self

from tests.hardening.hostile import EventLog
from tests.inproc import ThreadedDaemon
from vmmiod.config import (
    BlockConfig,
    ConsoleConfig,
    ConsolePortConfig,
    DgramBackend,
    GuestConfig,
    MmioConfig,
    NetConfig,
    SocketAddress,
    SocketBackend,
)
from vmmiod.devices.block import BlockDevice
from vmmiod.devices.console import ConsoleDevice
from vmmiod.devices.net import NetDevice
from vmmiod.hypervisors.generic.protocol import Window
from vmmiod.sim.vmm import SimVmm

BLOCK_BASE, NET_BASE, CON_BASE = 0x0200_0000, 0x0200_0200, 0x0200_0400
BLOCK_IRQ, NET_IRQ, CON_IRQ = 33, 34, 35
GUEST = GuestConfig("hardening")


class InprocGuest:
    """`with InprocGuest(dir) as g:` a started ThreadedDaemon, a connected SimVmm, a peer."""

    def __init__(self, where: Path, *, image_size: int = 16 << 20, block: bool = True,
                 net: bool = True, console: bool = True) -> None:
        self.dir = where
        self.events = EventLog()
        self.log = self.events.logger()
        self.image = where / "disk.img"
        self.console_path = where / "console.sock"
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.settimeout(5)
        specs: list[tuple[Any, int, int]] = []
        if block:
            with open(self.image, "ab") as f:
                f.truncate(image_size)
            specs.append((BlockDevice(BlockConfig(
                id="vda", mmio=MmioConfig(BLOCK_BASE, BLOCK_IRQ), path=self.image,
                queue_size=128), GUEST, log=self.log.bind(device="vda")), BLOCK_BASE, BLOCK_IRQ))
        if net:
            specs.append((NetDevice(NetConfig(
                id="net0", mmio=MmioConfig(NET_BASE, NET_IRQ), backend=DgramBackend(
                    local=SocketAddress("udp", "127.0.0.1", 0),
                    remote=SocketAddress("udp", "127.0.0.1", self.peer.getsockname()[1]))),
                GUEST, log=self.log.bind(device="net0")), NET_BASE, NET_IRQ))
        if console:
            specs.append((ConsoleDevice(ConsoleConfig(
                id="con0", mmio=MmioConfig(CON_BASE, CON_IRQ),
                ports=(ConsolePortConfig("console", SocketBackend(path=self.console_path)),)),
                GUEST, log=self.log.bind(device="con0")), CON_BASE, CON_IRQ))
        self.devices = {dev.name: dev for dev, _b, _i in specs}
        self.daemon = ThreadedDaemon(where / "vmm.sock", specs, log=self.log)
        self.vmm = SimVmm(ram_size=64 << 20, timeout=10.0)

    def window(self, base: int) -> Window:
        assert self.vmm.server is not None
        (w,) = [w for w in self.vmm.server.windows if w.base == base]
        return w

    def tasks(self) -> int:
        return self.daemon.call(lambda: len(asyncio.all_tasks()))

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events.events
                if e.get("level") in ("error", "exception", "critical")
                or e.get("event") == "guest_protocol_violation"]

    def __enter__(self) -> Self:
        self.daemon.start()
        try:
            self.vmm.connect(self.daemon.socket_path)
        except BaseException:
            self.daemon.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.vmm.close()
        finally:
            self.daemon.stop()
            self.peer.close()
