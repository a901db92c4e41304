"""virtio-console through the real register window and the generic IOREQ channel.

The simulated guest (vmmiod/sim/console.py: Linux's hvc0 probe, no MULTIPORT) runs in this
thread; the daemon half (bus, VirtioMmio window, ConsoleDevice, socket backend) on its own loop.
"""

from __future__ import annotations

from pathlib import Path

from tests.inproc import ThreadedDaemon
from vmmiod.config import ConsoleConfig, ConsolePortConfig, GuestConfig, MmioConfig, SocketBackend
from vmmiod.devices.console import CONFIG_EMERG_WR, ConsoleDevice
from vmmiod.sim.console import ConsoleDriver, connect_console, run_console_workload
from vmmiod.sim.vmm import SimVmm

BASE, IRQ = 0x0200_0000, 34


def test_console_workload_through_the_channel(tmp_path: Path) -> None:
    sock = tmp_path / "hvc0.sock"
    cfg = ConsoleConfig("hvc0", MmioConfig(BASE, IRQ),
                        (ConsolePortConfig("console", SocketBackend(path=sock)),),
                        cols=120, rows=40)
    device = ConsoleDevice(cfg, GuestConfig("t"))
    with ThreadedDaemon(tmp_path / "vmm.sock", [(device, BASE, IRQ)]) as daemon:
        with SimVmm() as vmm:
            dev = ConsoleDriver(vmm, vmm.connect(daemon.socket_path).windows[0])
            client = connect_console(str(sock))
            # Emergency write through the config window before any queue exists.
            vmm.write(BASE + 0x100 + CONFIG_EMERG_WR, ord("E"), size=4)
            assert client.recv(1) == b"E"
            dev.start()
            result = run_console_workload(dev, client, echoes=10, bulk=1 << 20)
            assert result["failures"] == []
            assert (result["cols"], result["rows"]) == (120, 40)
            dev.stop()
            client.close()
        counters = daemon.call(device.stats)
    assert counters["port0_bytes_from_guest"] >= 1 << 20
    assert counters["port0_bytes_to_guest"] >= 1 << 20
    assert counters["dropped_bytes"] == 0
