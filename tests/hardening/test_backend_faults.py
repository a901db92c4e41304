"""Block backend faults under a running daemon (`vmmiod run`, generic channel, simulated guest,
all three devices): the guest sees IOERR for the requests the fault touches, the console and
the network carry on, the daemon never exits (and stops cleanly afterwards).

Real fault sources only: a full tmpfs (ENOSPC), a loop device over a full tmpfs (EIO at
writeback), a device-mapper target switched to `error` mid-stream (where device-mapper
exists), the image truncated under the daemon, and ext4 remounting itself read-only after an
error (errors=remount-ro; `mount -o remount,ro` is refused while the image is open for write).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hardening.daemon_guest import DaemonGuest
from vmmiod.sim.block import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, losetup, dmsetup)")
CHUNK = 64 << 10


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                       check=False)
    if r.returncode:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def io(g: DaemonGuest, rtype: int, sector: int, data: bytes | None = None,
       length: int = 0) -> tuple[int, bytes]:
    assert g.blk is not None
    res = g.blk.request(rtype, sector, data, length)
    return res.status, res.data


def carries_on(g: DaemonGuest) -> None:
    assert g.check_others() == []
    assert g.alive()


def test_image_truncated_under_the_daemon(tmp_path: Path) -> None:
    image = sparse(tmp_path / "disk.img", 8 << 20)
    with DaemonGuest(tmp_path / "g", image) as g:
        low, high = os.urandom(CHUNK), os.urandom(CHUNK)
        assert io(g, VIRTIO_BLK_T_OUT, 0, low)[0] == VIRTIO_BLK_S_OK
        assert io(g, VIRTIO_BLK_T_OUT, 8192, high)[0] == VIRTIO_BLK_S_OK  # at 4 MiB
        assert io(g, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
        os.truncate(image, 1 << 20)  # the operator's mistake, under a running guest
        assert io(g, VIRTIO_BLK_T_IN, 8192, length=CHUNK)[0] == VIRTIO_BLK_S_IOERR
        assert io(g, VIRTIO_BLK_T_IN, 0, length=CHUNK) == (VIRTIO_BLK_S_OK, low)
        carries_on(g)
        # A write past the new end extends the file again (raw-image semantics); the hole
        # before it reads as zeros, as the guest's capacity never changed.
        assert io(g, VIRTIO_BLK_T_OUT, 8192, high)[0] == VIRTIO_BLK_S_OK
        assert io(g, VIRTIO_BLK_T_IN, 8192, length=CHUNK) == (VIRTIO_BLK_S_OK, high)
        assert io(g, VIRTIO_BLK_T_IN, 4096, length=CHUNK) == (VIRTIO_BLK_S_OK, bytes(CHUNK))
        events = [e.get("event") for e in g.daemon.log_events()]
        assert "block_io_error" in events and not g.problems_logged()
        assert g.stop() == 0


@root_only
def test_enospc_on_a_full_filesystem(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        image = sparse(mnt / "disk.img", 16 << 20)
        with DaemonGuest(tmp_path / "g", image) as g:
            written = {}
            statuses = []
            for i in range(32):  # 2 MiB into a 1 MiB filesystem
                data = os.urandom(CHUNK)
                status = io(g, VIRTIO_BLK_T_OUT, i * 128, data)[0]
                statuses.append(status)
                if status == VIRTIO_BLK_S_OK:
                    written[i] = data
            assert statuses[0] == VIRTIO_BLK_S_OK and VIRTIO_BLK_S_IOERR in statuses
            carries_on(g)
            for i, data in written.items():  # everything acknowledged is there
                assert io(g, VIRTIO_BLK_T_IN, i * 128, length=CHUNK) == (VIRTIO_BLK_S_OK, data)
            again = os.urandom(CHUNK)  # blocks already allocated can be rewritten
            assert io(g, VIRTIO_BLK_T_OUT, 0, again)[0] == VIRTIO_BLK_S_OK
            assert io(g, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
            counters = [e for e in g.daemon.log_events() if e.get("event") == "block_io_error"]
            assert counters and counters[0].get("errno") == 28  # ENOSPC
            assert not g.problems_logged()
            assert g.stop() == 0


@root_only
def test_eio_at_writeback_from_a_loop_device(tmp_path: Path) -> None:
    """Writes land in the page cache; the FLUSH's writeback fails with EIO (the loop device's
    own filesystem is full). The flush fails, every later flush too (sticky), reads go on."""
    with tmpfs(tmp_path / "mnt", "512k") as mnt:
        back = sparse(mnt / "back.img", 16 << 20)
        with loop_device(back) as dev, DaemonGuest(tmp_path / "g", dev) as g:
            for i in range(16):
                assert io(g, VIRTIO_BLK_T_OUT, i * 128, b"e" * CHUNK)[0] == VIRTIO_BLK_S_OK
            assert io(g, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_IOERR
            carries_on(g)
            assert io(g, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_IOERR  # sticky: no lie
            assert io(g, VIRTIO_BLK_T_IN, 0, length=4096)[0] == VIRTIO_BLK_S_OK
            events = [e for e in g.daemon.log_events() if e.get("event") == "block_flush_failed"]
            assert events and events[0].get("errno") == 5  # EIO
            assert not g.problems_logged()
            assert g.stop() == 0


def _dm_unavailable() -> str | None:
    if shutil.which("dmsetup") is None:
        return "dmsetup is not installed"
    r = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True, check=False)
    if r.returncode or "error" not in r.stdout:
        return ("device-mapper is not available in this kernel: "
                f"{(r.stderr or r.stdout).strip().splitlines()[:1]}")
    return None


@root_only
def test_eio_mid_stream_from_a_device_mapper_target(tmp_path: Path) -> None:
    """A linear target switched to `error` in the middle of the guest's I/O, and back."""
    reason = _dm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    name = f"vmmiod-hard-{os.getpid()}"
    back = sparse(tmp_path / "good.img", 8 << 20)
    with loop_device(back) as loop:
        linear = f"0 16384 linear {loop} 0\n"
        subprocess.run(["dmsetup", "create", name], input=linear, text=True, check=True)
        try:
            def table(text: str) -> None:
                for cmd in (["suspend", name], ["load", name], ["resume", name]):
                    subprocess.run(["dmsetup", *cmd], input=text if cmd[0] == "load" else None,
                                   text=True, check=True)

            with DaemonGuest(tmp_path / "g", f"/dev/mapper/{name}", cache="none") as g:
                data = os.urandom(CHUNK)
                assert io(g, VIRTIO_BLK_T_OUT, 0, data)[0] == VIRTIO_BLK_S_OK
                table("0 16384 error\n")
                assert io(g, VIRTIO_BLK_T_IN, 0, length=CHUNK)[0] == VIRTIO_BLK_S_IOERR
                assert io(g, VIRTIO_BLK_T_OUT, 128, data)[0] == VIRTIO_BLK_S_IOERR
                carries_on(g)
                table(linear)
                assert io(g, VIRTIO_BLK_T_IN, 0, length=CHUNK) == (VIRTIO_BLK_S_OK, data)
                assert io(g, VIRTIO_BLK_T_OUT, 128, data)[0] == VIRTIO_BLK_S_OK
                assert not g.problems_logged()
                assert g.stop() == 0
        finally:
            subprocess.run(["dmsetup", "remove", "--force", name], check=False)


@root_only
def test_filesystem_remounted_read_only_under_the_daemon(tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    disk = sparse(tmp_path / "ext4.raw", 64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(disk) as loop:
        subprocess.run(["mount", "-o", "errors=remount-ro", loop, str(mnt)], check=True)
        try:
            trigger = Path(f"/sys/fs/ext4/{os.path.basename(loop)}/trigger_fs_error")
            if not trigger.exists():
                pytest.skip(f"{trigger} is missing: cannot make ext4 remount itself read-only")
            image = sparse(mnt / "disk.img", 8 << 20)
            with DaemonGuest(tmp_path / "g", image) as g:
                data = os.urandom(CHUNK)
                assert io(g, VIRTIO_BLK_T_OUT, 0, data)[0] == VIRTIO_BLK_S_OK
                assert io(g, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
                trigger.write_text("vmmiod hardening test\n")  # ext4_error -> remount-ro
                opts = next(line for line in Path("/proc/mounts").read_text().splitlines()
                            if f" {mnt} " in line).split()[3].split(",")
                assert "ro" in opts or "emergency_ro" in opts, opts  # 6.x: emergency_ro
                assert io(g, VIRTIO_BLK_T_OUT, 128, data)[0] == VIRTIO_BLK_S_IOERR
                assert io(g, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_IOERR
                assert io(g, VIRTIO_BLK_T_IN, 0, length=CHUNK) == (VIRTIO_BLK_S_OK, data)
                carries_on(g)
                errnos = {e.get("errno") for e in g.daemon.log_events()
                          if e.get("event") in ("block_io_error", "block_flush_failed")}
                assert 30 in errnos  # EROFS
                assert not g.problems_logged()
                assert g.stop() == 0
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
