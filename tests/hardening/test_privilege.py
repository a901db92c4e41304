"""The daemon with exactly the capabilities systemd/vmmiod@.service leaves it
(CapabilityBoundingSet=CAP_NET_ADMIN CAP_IPC_LOCK, root, no ambient capabilities): it serves
all three devices, holds nothing more, creates its TAP only thanks to CAP_NET_ADMIN, and an
image it may not open is one clear refusal. setpriv(1) applies the bounding set as systemd does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from tests.hardening.daemon_guest import write_guest
from vmmiod.sim.block import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlockDriver
from vmmiod.sim.harness import BLOCK_BASE, DaemonError, DaemonProcess, GuestFiles
from vmmiod.sim.net import udp_peer
from vmmiod.sim.net_testkit import NetNamespace
from vmmiod.sim.vmm import SimVmm

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop capabilities from"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

CAP_DAC_OVERRIDE, CAP_NET_ADMIN, CAP_IPC_LOCK = 1, 12, 14
UNIT_CAPS = ("net_admin", "ipc_lock")


def setpriv(caps: tuple[str, ...]) -> list[str]:
    keep = "".join(f",+{c}" for c in caps)
    return ["setpriv", f"--bounding-set=-all{keep}", "--inh-caps=-all", "--"]


def start(files: GuestFiles, prefix: list[str], timeout: float = 15.0) -> DaemonProcess:
    """DaemonProcess.start() with a command prefix (setpriv, ip netns exec)."""
    d = DaemonProcess(files)
    notify_path = files.dir / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.05)
    try:
        with open(files.dir / "daemon.stderr", "wb") as err:
            d.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "vmmiod", "run", str(files.config)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if d.proc.poll() is not None:
                raise DaemonError(f"exited with status {d.proc.returncode}: {d.why()}")
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return d
            except TimeoutError:
                pass
        d.kill()
        raise DaemonError("no READY=1")
    finally:
        notify.close()
        notify_path.unlink(missing_ok=True)


def cap_eff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)


def serves(files: GuestFiles) -> None:
    """A VMM connects and finds the three windows; a block write reads back."""
    with SimVmm() as vmm:
        server = vmm.connect(files.socket)
        assert len(server.windows) == 3
        (w,) = [w for w in server.windows if w.base == BLOCK_BASE]
        blk = BlockDriver(vmm, w)
        blk.start()
        assert blk.request(VIRTIO_BLK_T_OUT, 0, b"c" * 4096).status == VIRTIO_BLK_S_OK
        assert blk.request(VIRTIO_BLK_T_IN, 0, length=4096).data == b"c" * 4096


def test_daemon_serves_with_the_units_capabilities_and_holds_no_more(tmp_path: Path) -> None:
    files = GuestFiles(tmp_path)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    os.chmod(image, 0o600)
    peer = udp_peer()
    write_guest(files, image, net_port=peer.getsockname()[1])
    d = start(files, setpriv(UNIT_CAPS))
    try:
        assert cap_eff(d.pid) == (1 << CAP_NET_ADMIN) | (1 << CAP_IPC_LOCK)
        serves(files)
        assert d.stop() == 0
    finally:
        d.kill()
        peer.close()


def test_image_of_another_user_needs_dac_override(tmp_path: Path) -> None:
    files = GuestFiles(tmp_path)
    image = tmp_path / "theirs.img"
    image.write_bytes(bytes(1 << 20))
    os.chown(image, 4242, 4242)
    os.chmod(image, 0o600)
    write_guest(files, image, net_port=None, console=False)
    with pytest.raises(DaemonError) as info:
        start(files, setpriv(UNIT_CAPS))
    assert "status 78" in str(info.value) and "not readable" in str(info.value), info.value
    assert str(image) in str(info.value)
    d = start(files, setpriv((*UNIT_CAPS, "dac_override")))  # the documented drop-in
    assert d.stop() == 0


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun")
def test_tap_creation_needs_cap_net_admin_and_nothing_else(tmp_path: Path) -> None:
    files = GuestFiles(tmp_path)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    write_guest(files, image, net_port=None, console=False)
    doc = yaml.safe_load(files.config.read_text())
    doc["devices"].append({"type": "net", "id": "net0", "mmio": {"base": 0x0200_0200, "irq": 34},
                           "backend": {"kind": "tap", "ifname": "vcap0"}})
    files.config.write_text(yaml.safe_dump(doc))
    with NetNamespace(prefix="vmmiod-c") as ns:
        inside = ["ip", "netns", "exec", ns.name]
        d = start(files, inside + setpriv(UNIT_CAPS))
        try:
            assert "vcap0" in ns.ip("link", "show")
            assert d.stop() == 0
        finally:
            d.kill()
        with pytest.raises(DaemonError) as info:
            start(files, inside + setpriv(("ipc_lock",)))
        assert "status 69" in str(info.value) and "CAP_NET_ADMIN" in str(info.value)
