"""The full device stack one daemon builds for one guest, in this process, for hostile tests.

MmioBus + one VirtioMmio window per device; block on a sparse image file, net on the dgram
backend (UDP on loopback, with a peer socket the test holds), console with two ports (a Unix
socket and a file) so the multiport control queues are in play. Guest memory is a
`GuardedMemory` (tests/hardening/hostile.py): two adjacent RAM regions and a read-only "ROM"
region after a hole, each between guard bytes. Every logger is an `EventLog`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from tests.hardening.hostile import EventLog, GuardedMemory, RecordingLine
from vmmiod.bus import MmioBus
from vmmiod.config import (
    BlockConfig,
    ConsoleConfig,
    ConsolePortConfig,
    DgramBackend,
    FileBackend,
    GuestConfig,
    MmioConfig,
    NetConfig,
    SocketAddress,
    SocketBackend,
)
from vmmiod.devices.block import BlockDevice
from vmmiod.devices.console import ConsoleDevice
from vmmiod.devices.net import NetDevice
from vmmiod.mmio import VirtioMmio

RAM_GPA = 0x4000_0000
RAM_SIZE = 512 << 10
RAM2_GPA = RAM_GPA + RAM_SIZE  # adjacent: ranges may run from one region into the next
RAM2_SIZE = 64 << 10
ROM_GPA = 0x4010_0000  # after a hole
ROM_SIZE = 16 << 10
SLICE = 160 << 10  # each device's own part of RAM for its rings and buffers
WINDOW_BASE = 0x0200_0000
WINDOW_SIZE = 0x200
IRQ_BASE = 33
IMAGE_SIZE = 1 << 20
QUEUE_SIZE = 16
NAMES = ("block", "net", "console")


def slice_of(i: int) -> tuple[int, int]:
    return RAM_GPA + i * SLICE, SLICE


class Stack:
    """Build with `Stack(versions)`, then `await open()`; `await close()` releases everything."""

    def __init__(self, versions: tuple[int, int, int] = (2, 2, 2)) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vmmiod-hostile-"))
        self.events = EventLog()
        self.log = self.events.logger()
        self.memory = GuardedMemory([(RAM_GPA, RAM_SIZE, True), (RAM2_GPA, RAM2_SIZE, True),
                                     (ROM_GPA, ROM_SIZE, False)])
        self.image = self.dir / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.setblocking(False)
        guest = GuestConfig("hostile")
        mmio = [MmioConfig(base=WINDOW_BASE + i * WINDOW_SIZE, irq=IRQ_BASE + i,
                           version=v)  # type: ignore[arg-type]
                for i, v in enumerate(versions)]
        self.console_socket = self.dir / "con.sock"
        self.devices: list[Any] = [
            BlockDevice(BlockConfig(id="vda", mmio=mmio[0], path=self.image,
                                    queue_size=QUEUE_SIZE), guest, log=self.log.bind(device="vda")),
            NetDevice(NetConfig(id="net0", mmio=mmio[1], queue_size=QUEUE_SIZE,
                                backend=DgramBackend(
                                    local=SocketAddress("udp", "127.0.0.1", 0),
                                    remote=SocketAddress("udp", "127.0.0.1",
                                                         self.peer.getsockname()[1]))),
                      guest, log=self.log.bind(device="net0")),
            ConsoleDevice(ConsoleConfig(
                id="con0", mmio=mmio[2], multiport=True, queue_size=QUEUE_SIZE,
                ports=(ConsolePortConfig("console", SocketBackend(path=self.console_socket)),
                       ConsolePortConfig("log", FileBackend(path=self.dir / "con.log")))),
                guest, log=self.log.bind(device="con0")),
        ]
        self.lines = [RecordingLine(IRQ_BASE + i) for i in range(3)]
        self.bus = MmioBus(log=self.log)
        self.windows: list[VirtioMmio] = []
        self.versions = versions
        self.opened = False

    def base(self, i: int) -> int:
        return WINDOW_BASE + i * WINDOW_SIZE

    async def open(self) -> None:
        for dev in self.devices:
            await dev.open()
        self.opened = True
        for i, dev in enumerate(self.devices):
            w = VirtioMmio(dev, self.lines[i], version=self.versions[i], log=dev.log)
            self.bus.register(self.base(i), WINDOW_SIZE, w)
            self.windows.append(w)
        self.bus.attach_memory(self.memory)

    @property
    def net_address(self) -> Any:
        return self.devices[1].backend.local_address

    async def close(self) -> None:
        self.bus.detach_memory()
        if self.opened:
            for dev in self.devices:
                await dev.close()
        self.peer.close()
        await asyncio.sleep(0)
        for p in self.dir.iterdir():
            p.unlink()
        os.rmdir(self.dir)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def map_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
