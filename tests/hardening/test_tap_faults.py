"""virtio-net on a real TAP that is set down, deleted and recreated while the guest transmits
(root: each test makes its own network namespace). The guest must see the link go down
(config interrupt, status 0) and come back; frames sent meanwhile are returned to it (dropped),
the device never fails and nothing escapes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.hardening.hostile import EventLog
from vmmiod.config import GuestConfig, MmioConfig, NetConfig, TapBackend
from vmmiod.devices.net import NetDevice
from vmmiod.memory import memfd_memory
from vmmiod.sim.net_model import NetDriver
from vmmiod.sim.net_testkit import NetNamespace
from vmmiod.sim.vring import Allocator

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and a TAP"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
]

TAP = "vhard0"
GPA = 0x4000_0000
FRAME = b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x88\xb5" + b"under load" * 10
STATUS_OFFSET = 6  # virtio_net_config.status


class Rig:
    def __init__(self, ns: NetNamespace) -> None:
        self.ns = ns
        self.events = EventLog()
        self.memory, self.fd = memfd_memory(32 << 20, GPA)
        cfg = NetConfig(id="net0", mmio=MmioConfig(base=0x1000, irq=5),
                        backend=TapBackend(ifname=TAP))
        self.device = NetDevice(cfg, GuestConfig(name="hard"), log=self.events.logger())
        self.driver: NetDriver
        self.sent = 0

    async def start(self) -> None:
        await self.device.open()
        self.driver = NetDriver(self.device, self.memory, Allocator(GPA, 32 << 20))
        self.driver.post_rx()

    async def stop(self) -> None:
        self.device.reset()
        await self.device.close()
        os.close(self.fd)

    def link(self) -> int:
        return self.device.read_config(STATUS_OFFSET, 2)

    async def load(self, until: asyncio.Event) -> None:
        """Transmit as fast as the guest can, and take back whatever arrives."""
        while not until.is_set():
            for _ in range(16):
                self.driver.send(FRAME, kick=False)
                self.sent += 1
            self.driver.kick(1)
            await self.driver.flush_tx(timeout=2.0)
            self.driver.rx_frames()
            self.driver.post_rx()

    def seen(self, up: bool) -> int:
        """How many times the device reported the link going `up` (or down)."""
        return sum(1 for e in self.events.events
                   if e.get("event") == "net_link_changed" and e.get("link_up") is up)

    async def wait_link(self, up: bool, timeout: float = 3.0, seen: int | None = None) -> bool:
        """The guest's link status reads `up`, or (with `seen`, the count before the change)
        the device reported the change since: a deleted TAP is recreated after 2 s, and a
        slow run (coverage, load) may only look after the link came back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if bool(self.link()) == up or (seen is not None and self.seen(up) > seen):
                return True
            await asyncio.sleep(0.01)
        return False

    async def ip(self, *args: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.ns.ip(*args))

    def escaped(self) -> list[dict[str, Any]]:
        return [e for e in self.events.events if e.get("level") in ("exception", "critical")
                or e.get("event") == "guest_protocol_violation"]


def in_netns(body: Callable[[Rig], Awaitable[None]]) -> None:
    async def main(ns: NetNamespace) -> None:
        rig = Rig(ns)
        await rig.start()
        stop = asyncio.Event()
        load = asyncio.ensure_future(rig.load(stop))
        try:
            await body(rig)
        finally:
            stop.set()
            await asyncio.gather(load, return_exceptions=True)
            await rig.stop()
        assert load.exception() is None, load.exception()
        assert not rig.device.failed and not rig.escaped(), rig.escaped()

    with NetNamespace(prefix="vmmiod-h") as ns:
        ns.run(lambda: asyncio.run(asyncio.wait_for(main(ns), 60)))


def test_tap_set_down_and_up_under_load() -> None:
    async def body(rig: Rig) -> None:
        t = rig.driver.transport
        await asyncio.sleep(0.1)
        assert rig.link() == 1 and rig.sent > 0
        for cycle in range(5):
            changes = t.config_changes
            await rig.ip("link", "set", TAP, "down")
            assert await rig.wait_link(False), f"cycle {cycle}: the guest never saw link down"
            assert t.config_changes > changes
            sent = rig.sent
            await asyncio.sleep(0.05)
            assert rig.sent > sent  # transmit goes on: frames come back to the guest
            await rig.ip("link", "set", TAP, "up")
            assert await rig.wait_link(True), f"cycle {cycle}: the guest never saw link up"
        c = rig.device.counters
        assert c["tx_dropped_link_down"] > 0 and c["tx_frames"] > 0
        print(f"\nTAP down/up x5 under load: {rig.sent} frames queued, {c['tx_frames']} sent, "
              f"{c['tx_dropped_link_down']} dropped while down, "
              f"{t.config_changes} config interrupts")
    in_netns(body)


def test_tap_deleted_under_load_link_goes_down() -> None:
    async def body(rig: Rig) -> None:
        t = rig.driver.transport
        await asyncio.sleep(0.1)
        changes, downs = t.config_changes, rig.seen(False)
        await rig.ip("link", "del", TAP)
        assert await rig.wait_link(False, seen=downs), "the guest never saw the link go down"
        assert t.config_changes > changes
        sent = rig.sent
        await asyncio.sleep(0.1)
        assert rig.sent > sent  # frames still come back (dropped: the TAP is gone)
        c = rig.device.counters
        print(f"\nTAP deleted under load: {c['tx_frames']} sent before, "
              f"{c['tx_dropped_backend_error'] + c['tx_dropped_link_down']} dropped after")
    in_netns(body)


def test_tap_recreated_link_comes_back() -> None:
    async def body(rig: Rig) -> None:
        await asyncio.sleep(0.05)
        downs = rig.seen(False)
        await rig.ip("link", "del", TAP)
        assert await rig.wait_link(False, seen=downs)
        # vmmiod made this TAP (create), so it makes it again after 2 s: whichever comes first.
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: rig.ns.ip("tuntap", "add", TAP, "mode", "tap", check=False))
        await rig.ip("link", "set", TAP, "up")
        assert await rig.wait_link(True), "the guest never saw the link come back"
        c = rig.device.counters
        before = c["tx_frames"]
        await asyncio.sleep(0.1)
        assert c["tx_frames"] > before  # frames flow through the new TAP
    in_netns(body)
