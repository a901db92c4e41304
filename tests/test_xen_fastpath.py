"""The Xen adaptor's IOEVENTFD fast path, with a stand-in privcmd (no Xen needed): one eventfd
per queue of each window, counted through vmmiod.transport (never the window's device), and a
signalled eventfd replayed on the bus as the guest's QueueNotify write."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from vmmiod.devices.base import VirtioDevice
from vmmiod.hypervisors.xen import fastpath
from vmmiod.hypervisors.xen.abi import VIRTIO_MMIO_QUEUE_NOTIFY
from vmmiod.mmio import VirtioMmio

BASE = 0x0200_0000


class Line:
    def raise_(self) -> None:
        pass

    def lower(self) -> None:
        pass


class FakePrivcmd:
    def __init__(self, fail_after: int = 1 << 30) -> None:
        self.fds: list[tuple[int, int]] = []  # (vq, efd)
        self.fail_after = fail_after

    def ioeventfd(self, page_addr: int, ports: list[int], window_base: int, vq: int) -> int:
        if len(self.fds) >= self.fail_after:
            raise OSError(25, "no IOEVENTFD")
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds.append((vq, efd))
        return efd

    def close(self) -> None:
        for _vq, efd in self.fds:
            os.close(efd)


class FakeServer:
    def __init__(self) -> None:
        self.page_addr = 0x1000
        self.ports = [5, 6]


class Bus:
    def __init__(self, windows: list[tuple[int, int, Any]]) -> None:
        self._windows = windows
        self.accesses: list[tuple[int, int, bool, int]] = []

    def windows(self) -> list[tuple[int, int, Any]]:
        return self._windows

    def access(self, addr: int, size: int, is_write: bool, data: int = 0) -> int:
        self.accesses.append((addr, size, is_write, data))
        return 0


def test_one_ioeventfd_per_queue_and_replay_on_the_bus() -> None:
    window = VirtioMmio(VirtioDevice("d", [8, 8, 8]), Line())
    bus = Bus([(BASE, 0x200, window), (BASE + 0x200, 0x200, object())])  # a non-virtio window
    privcmd = FakePrivcmd()
    counters: dict[str, int] = {}
    loop = asyncio.new_event_loop()
    try:
        n = fastpath._ioeventfds(privcmd, bus, FakeServer(), loop,  # type: ignore[arg-type]
                                 counters)
        assert n == 3 and [vq for vq, _ in privcmd.fds] == [0, 1, 2]
        os.eventfd_write(privcmd.fds[2][1], 1)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert bus.accesses == [(BASE + VIRTIO_MMIO_QUEUE_NOTIFY, 4, True, 2)]
        assert counters["ioeventfd_notifies"] == 1
        for _vq, efd in privcmd.fds:
            loop.remove_reader(efd)
    finally:
        loop.close()
        privcmd.close()


def test_a_kernel_without_ioeventfd_stops_at_the_first_refusal() -> None:
    window = VirtioMmio(VirtioDevice("d", [8, 8]), Line())
    privcmd = FakePrivcmd(fail_after=1)
    loop = asyncio.new_event_loop()
    try:
        n = fastpath._ioeventfds(privcmd, Bus([(BASE, 0x200, window)]),  # type: ignore[arg-type]
                                 FakeServer(), loop, {})  # type: ignore[arg-type]
        assert n == 1
        loop.remove_reader(privcmd.fds[0][1])
    finally:
        loop.close()
        privcmd.close()
