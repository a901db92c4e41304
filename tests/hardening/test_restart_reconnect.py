"""The daemon restarted (as systemd's Restart= or `systemctl restart` does) while the guest keeps
running, on the generic channel: the VMM notices at once, reconnects to the new daemon with the
same guest RAM and ioreq page, and the guest's devices carry on where they were (the device
state record, docs/restart.md): no reset, the request in flight completes, all three devices
work. See docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
import time
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

STATUS, QUEUE_SEL, QUEUE_READY, INTERRUPT_STATUS = 0x070, 0x030, 0x044, 0x060
DRIVER_OK_STATUS = 0x0F  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_daemon_restart_guest_carries_on(tmp_path: Path, how: str) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    with DaemonGuest(tmp_path / "g", image, on_disconnect="wait") as g:
        assert g.blk is not None and g.vmm is not None
        g.vmm.rejoin = 15.0
        flushed = os.urandom(64 << 10)
        assert g.blk.request(VIRTIO_BLK_T_OUT, 0, flushed).status == VIRTIO_BLK_S_OK
        assert g.blk.request(VIRTIO_BLK_T_FLUSH, 0).status == VIRTIO_BLK_S_OK
        assert g.check_others() == []
        # A request in flight when the daemon goes.
        late = os.urandom(4096)
        g.blk.submit(VIRTIO_BLK_T_OUT, 1024, late)
        old = g.daemon
        assert old.proc is not None
        t0 = time.monotonic()
        if how == "sigkill":
            old.proc.kill()
            assert old.proc.wait(10) == -signal.SIGKILL
        else:
            assert old.stop() == 0
        # systemd starts the next instance; the VMM rejoins at the guest's next access.
        g.daemon = DaemonProcess(g.files).start()
        ready = time.monotonic() - t0
        # What the guest sees: every device as it left it, no reset, nothing lost.
        for base in (BLOCK_BASE, NET_BASE, CONSOLE_BASE):
            assert g.vmm.read(base + STATUS) == DRIVER_OK_STATUS
            g.vmm.write(base + QUEUE_SEL, 0)
            assert g.vmm.read(base + QUEUE_READY) == 1
        (gone, back), = g.vmm.rejoins
        g.blk.kick()
        ((_, res),) = g.blk.wait_all()
        assert res.status == VIRTIO_BLK_S_OK
        res = g.blk.request(VIRTIO_BLK_T_IN, 0, length=len(flushed))
        assert res.status == VIRTIO_BLK_S_OK and res.data == flushed
        res = g.blk.request(VIRTIO_BLK_T_IN, 1024, length=len(late))
        assert res.status == VIRTIO_BLK_S_OK and res.data == late
        assert g.client is not None
        g.client.close()  # the old console socket is gone with the old daemon
        g.client = connect_console(str(g.files.console))
        assert g.check_others() == []
        assert not g.problems_logged()
        events = g.daemon.log_events()
        assert [e for e in events if e.get("event") == "state_resumed"]
        assert not [e for e in events if e.get("event") == "state_record_refused"]
        assert not [e for e in events if e.get("level") in ("error", "critical")]
        print(f"\n{how}: stop -> READY=1 {ready * 1000:.0f} ms; VMM reconnected "
              f"{(back - gone) * 1000:.0f} ms after it saw the daemon go")
        assert g.stop() == 0


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
