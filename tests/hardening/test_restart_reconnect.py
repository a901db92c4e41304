"""The daemon restarted (as systemd's Restart= does) while the guest keeps running, on the
generic channel: the VMM notices at once, reconnects to the new daemon with the same guest RAM,
and the guest finds its devices reset; once its drivers set them up again, everything flushed
before the restart is there and all three devices work. See docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.hardening.daemon_guest import DaemonGuest
from vmmiod.sim.block import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from vmmiod.sim.console import connect_console
from vmmiod.sim.harness import BLOCK_BASE, CONSOLE_BASE, NET_BASE, DaemonProcess
from vmmiod.sim.vmm import SimError

STATUS, QUEUE_SEL, QUEUE_READY, INTERRUPT_STATUS = 0x070, 0x030, 0x044, 0x060


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_daemon_restart_vmm_reconnects_guest_reinitialises(tmp_path: Path, how: str) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    with DaemonGuest(tmp_path / "g", image, on_disconnect="wait") as g:
        assert g.blk is not None and g.vmm is not None
        flushed = os.urandom(64 << 10)
        assert g.blk.request(VIRTIO_BLK_T_OUT, 0, flushed).status == VIRTIO_BLK_S_OK
        assert g.blk.request(VIRTIO_BLK_T_FLUSH, 0).status == VIRTIO_BLK_S_OK
        assert g.check_others() == []
        # A request in flight when the daemon goes.
        g.blk.submit(VIRTIO_BLK_T_OUT, 1024, os.urandom(4096))
        used_before = g.blk.q.used_idx()
        old = g.daemon
        assert old.proc is not None
        if how == "sigkill":
            old.proc.kill()
            assert old.proc.wait(10) == -signal.SIGKILL
        else:
            assert old.stop() == 0
        # The VMM notices at once: the next access fails instead of hanging.
        with pytest.raises(SimError, match="closed the connection"):
            g.vmm.read(BLOCK_BASE + STATUS)
        # systemd starts the next instance; the VMM reconnects with the same RAM.
        g.daemon = DaemonProcess(g.files).start()
        g.vmm.disconnect(bye=False)
        server = g.vmm.connect(g.files.socket, wait=10.0)
        assert {w.base for w in server.windows} == {BLOCK_BASE, NET_BASE, CONSOLE_BASE}
        # What the guest sees: every device reset, no queue ready, no interrupt pending, and
        # the request that was in flight never completed.
        for base in (BLOCK_BASE, NET_BASE, CONSOLE_BASE):
            assert g.vmm.read(base + STATUS) == 0
            assert g.vmm.read(base + INTERRUPT_STATUS) == 0
            g.vmm.write(base + QUEUE_SEL, 0)
            assert g.vmm.read(base + QUEUE_READY) == 0
        assert g.blk.q.used_idx() == used_before
        # The guest's drivers set the devices up again (a Linux guest: virtio reset/restore).
        vmm = g.vmm
        if g.client is not None:
            g.client.close()  # the old console socket is gone with the old daemon
        g.blk = g.nic = g.con = None
        g.vmm = None
        g.connect_drivers(vmm, server)
        assert g.blk is not None
        res = g.blk.request(VIRTIO_BLK_T_IN, 0, length=len(flushed))
        assert res.status == VIRTIO_BLK_S_OK and res.data == flushed
        assert g.check_others() == []
        assert not g.problems_logged()
        assert g.stop() == 0
        assert not [e for e in old.log_events() if e.get("level") in ("error", "critical")]


def test_console_client_reconnects_after_restart(tmp_path: Path) -> None:
    """The console socket is recreated by the new daemon; a client that reconnects gets it."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    with DaemonGuest(tmp_path / "g", image) as g:
        assert g.daemon.proc is not None
        g.daemon.proc.kill()
        g.daemon.proc.wait(10)
        assert g.client is not None
        try:
            assert g.client.recv(100) == b""  # EOF: the daemon is gone
        except ConnectionResetError:
            pass  # or a reset, when the dead daemon left bytes unread
        g.daemon = DaemonProcess(g.files).start()
        c = connect_console(str(g.files.console))
        c.close()
