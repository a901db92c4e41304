"""The simulated guest's net and console workloads through the channel against the real devices,
and the guest driver's register sequence compared with Linux's virtio_mmio probe."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

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
from vmmiod.sim import virtio_mmio as r
from vmmiod.sim.block import BlockDriver
from vmmiod.sim.console import ConsoleDriver, connect_console, run_console_workload
from vmmiod.sim.guest import run_guest
from vmmiod.sim.net import NetDriver, make_frame, run_net_workload, udp_peer
from vmmiod.sim.vmm import SimVmm

NET_BASE, NET_IRQ = 0x0200_0200, 34
CON_BASE, CON_IRQ = 0x0200_0400, 35


def net_device(peer: socket.socket) -> NetDevice:
    remote = SocketAddress("udp", "127.0.0.1", peer.getsockname()[1])
    cfg = NetConfig("net0", MmioConfig(NET_BASE, NET_IRQ),
                    DgramBackend(local=SocketAddress("udp", "127.0.0.1", 0), remote=remote))
    return NetDevice(cfg, GuestConfig("t"))


def console_device(path: Path) -> ConsoleDevice:
    port = ConsolePortConfig("console", SocketBackend(path=path))
    return ConsoleDevice(ConsoleConfig("con0", MmioConfig(CON_BASE, CON_IRQ), (port,)),
                         GuestConfig("t"))


def test_net_frames_both_ways(tmp_path: Path) -> None:
    peer = udp_peer()
    try:
        with ThreadedDaemon(tmp_path / "vmm.sock", [(net_device(peer), NET_BASE, NET_IRQ)]) as td:
            with SimVmm() as vmm:
                nic = NetDriver(vmm, vmm.connect(td.socket_path).windows[0])
                nic.start()
                assert nic.link_up and len(nic.mac) == 6 and nic.mac[0] & 1 == 0
                result = run_net_workload(nic, peer, frames=300)
                assert result["failures"] == []
                assert result["tx_frames"] == result["rx_frames"] == 300
                # Largest and smallest frames cross unchanged too.
                import random
                rng = random.Random(9)
                for size in (60, 1514):
                    frame = make_frame(nic.mac, b"\xff" * 6, size, size, rng)
                    nic.send(frame)
                    assert peer.recvfrom(65536)[0] == frame
                nic.stop()
    finally:
        peer.close()


def test_console_echo_and_bulk(tmp_path: Path) -> None:
    path = tmp_path / "console.sock"
    with ThreadedDaemon(tmp_path / "vmm.sock", [(console_device(path), CON_BASE, CON_IRQ)]) as td:
        with SimVmm() as vmm:
            con = ConsoleDriver(vmm, vmm.connect(td.socket_path).windows[0])
            con.start()
            assert (con.cols, con.rows) == (80, 25)
            with connect_console(str(path)) as client:
                result = run_console_workload(con, client, echoes=10, bulk=512 << 10)
            assert result["failures"] == []
            con.stop()


def test_whole_guest_on_three_devices(tmp_path: Path) -> None:
    peer = udp_peer()
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    block = BlockDevice(BlockConfig("vda", MmioConfig(0x0200_0000, 33), img), GuestConfig("t"))
    con_path = tmp_path / "console.sock"
    devices = [(block, 0x0200_0000, 33), (net_device(peer), NET_BASE, NET_IRQ),
               (console_device(con_path), CON_BASE, CON_IRQ)]
    try:
        with ThreadedDaemon(tmp_path / "vmm.sock", devices) as td, SimVmm(vcpus=2) as vmm:
            vmm.connect(td.socket_path)
            results = run_guest(vmm, image_path=str(img), console_path=str(con_path),
                                net_peer=peer, quick=True)
            assert sorted(results) == ["block", "console", "net"]
            for kind, res in results.items():
                assert res["ok"], (kind, res["failures"])
                assert "VERSION_1" in res["features"] and "EVENT_IDX" in res["features"]
            assert "FLUSH" in results["block"]["features"]
            assert "MAC" in results["net"]["features"]
    finally:
        peer.close()


class Recorder:
    """Wraps SimVmm.mmio to record (op, offset, value) of every access to one window."""

    def __init__(self, vmm: SimVmm, base: int) -> None:
        self.log: list[tuple[str, int, int]] = []
        inner = vmm.mmio

        def mmio(addr: int, size: int, value: int = 0, *, read: bool, vcpu: int = 0) -> int:
            got = inner(addr, size, value, read=read, vcpu=vcpu)
            self.log.append(("r" if read else "w", addr - base, got if read else value))
            return got

        vmm.mmio = mmio  # type: ignore[method-assign]


def test_probe_follows_linux(tmp_path: Path) -> None:
    """vm_probe, virtio_dev_probe and vm_setup_vq, access for access (Linux 6.x, version 2)."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    block = BlockDevice(BlockConfig("vda", MmioConfig(0x0200_0000, 33), img), GuestConfig("t"))
    with ThreadedDaemon(tmp_path / "vmm.sock", [(block, 0x0200_0000, 33)]) as td:
        with SimVmm() as vmm:
            rec = Recorder(vmm, 0x0200_0000)
            dev = BlockDriver(vmm, vmm.connect(td.socket_path).windows[0])
            dev.start()
    ops: list[Any] = [(op, off) for op, off, _ in rec.log]
    q = ops.index(("w", r.QUEUE_SEL))
    assert ops[:q] == [
        ("r", r.MAGIC_VALUE), ("r", r.VERSION), ("r", r.DEVICE_ID), ("r", r.VENDOR_ID),
        ("w", r.STATUS),  # reset
        ("r", r.STATUS), ("w", r.STATUS),  # add ACKNOWLEDGE
        ("r", r.STATUS), ("w", r.STATUS),  # add DRIVER
        ("w", r.DEVICE_FEATURES_SEL), ("r", r.DEVICE_FEATURES),
        ("w", r.DEVICE_FEATURES_SEL), ("r", r.DEVICE_FEATURES),
        ("w", r.DRIVER_FEATURES_SEL), ("w", r.DRIVER_FEATURES),
        ("w", r.DRIVER_FEATURES_SEL), ("w", r.DRIVER_FEATURES),
        ("r", r.STATUS), ("w", r.STATUS), ("r", r.STATUS),  # FEATURES_OK, read back
    ]
    assert ops[q:q + 12] == [
        ("w", r.QUEUE_SEL), ("r", r.QUEUE_READY), ("r", r.QUEUE_NUM_MAX), ("w", r.QUEUE_NUM),
        ("w", r.QUEUE_DESC_LOW), ("w", r.QUEUE_DESC_HIGH),
        ("w", r.QUEUE_DRIVER_LOW), ("w", r.QUEUE_DRIVER_HIGH),
        ("w", r.QUEUE_DEVICE_LOW), ("w", r.QUEUE_DEVICE_HIGH), ("w", r.QUEUE_READY),
        ("r", r.CONFIG_GENERATION),  # capacity: generation, two halves, generation
    ]
    statuses = [v for op, off, v in rec.log if op == "w" and off == r.STATUS]
    assert statuses == [0, 1, 3, 11, 15]  # reset, ACK, +DRIVER, +FEATURES_OK, +DRIVER_OK
    assert rec.log[0][2] == r.MAGIC and rec.log[2][2] == 2
