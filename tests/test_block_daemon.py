"""virtio-blk through the whole daemon: `python -m vmmiod run` as a child process, the simulated
guest over the generic IOREQ channel. Durability across SIGKILL and the image lock between two
daemons."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from vmmiod.sim.block import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlockDriver,
)
from vmmiod.sim.harness import (
    BLOCK_BASE,
    DaemonError,
    DaemonProcess,
    GuestFiles,
    write_config,
)
from vmmiod.sim.vmm import SimVmm

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (losetup, mount)")


def block_window(vmm: SimVmm) -> BlockDriver:
    assert vmm.server is not None
    (window,) = [w for w in vmm.server.windows if w.base == BLOCK_BASE]
    dev = BlockDriver(vmm, window)
    dev.start()
    return dev


def start_daemon(work: Path, image_size: int = 8 << 20, **kw: object) -> DaemonProcess:
    work.mkdir(parents=True, exist_ok=True)
    files = GuestFiles(work, image_size=image_size)
    doc = write_config(files, net_peer_port=None, console=False, on_disconnect="wait",
                       **kw)  # type: ignore[arg-type]
    engine = os.environ.get("VMMIOD_TEST_IO_ENGINE")  # .ci/run runs these once per engine
    if engine:
        doc["devices"][0]["io_engine"] = engine
        files.config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return DaemonProcess(files).start()


def test_second_daemon_on_same_image_refuses(tmp_path: Path) -> None:
    first = start_daemon(tmp_path / "a")
    try:
        second_dir = tmp_path / "b"
        second_dir.mkdir()
        files = GuestFiles(second_dir)
        write_config(files, net_peer_port=None, console=False)
        # Point the second guest's disk at the first one's image.
        text = files.config.read_text().replace(str(files.image), str(first.files.image))
        files.config.write_text(text)
        second = DaemonProcess(files)
        with pytest.raises(DaemonError) as info:
            second.start()
        assert "status 69" in str(info.value)  # EX_UNAVAILABLE
        failed = [e for e in second.log_events() if e.get("event") == "startup_failed"]
        assert failed, second.log_events()
        msg = str(failed[0].get("message"))
        assert "locked by another process" in msg and str(first.files.image) in msg
        # The first daemon is unharmed and still serves its guest.
        with SimVmm() as vmm:
            vmm.connect(first.files.socket)
            dev = block_window(vmm)
            assert dev.request(VIRTIO_BLK_T_IN, 0, length=512).status == VIRTIO_BLK_S_OK
    finally:
        first.kill()


def test_flushed_write_survives_sigkill(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    image = daemon.files.image
    data = os.urandom(64 << 10)
    try:
        with SimVmm() as vmm:
            vmm.connect(daemon.files.socket)
            dev = block_window(vmm)
            assert dev.request(VIRTIO_BLK_T_OUT, 2048, data).status == VIRTIO_BLK_S_OK
            assert dev.request(VIRTIO_BLK_T_FLUSH, 0).status == VIRTIO_BLK_S_OK
            daemon.proc.kill()  # type: ignore[union-attr]  # SIGKILL: no orderly stop at all
            assert daemon.proc.wait(10) == -9  # type: ignore[union-attr]
    finally:
        daemon.kill()
    with open(image, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(len(data)) == data


# -- durability against a crash of the host, not only of the daemon --------------------------------
@contextlib.contextmanager
def _loop(backing: Path) -> Iterator[str]:
    out = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                         capture_output=True, text=True)
    dev = out.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def _mounted(dev: str, where: Path) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "ext4", dev, str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@root_only
def test_flushed_write_is_on_the_disk_not_only_in_page_cache(tmp_path: Path) -> None:
    """The image lives on ext4 on a loop device. After FLUSH completes and the daemon is
    SIGKILLed, a byte copy of the loop device's backing file is taken: that is what the disk
    holds, without the page cache of the filesystem above it (what a power cut leaves). The
    copy is mounted (journal replayed) and must hold the flushed data."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed")
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True, capture_output=True)
    data = os.urandom(64 << 10)
    try:
        with _loop(disk) as dev, _mounted(dev, tmp_path / "mnt") as mnt:
            daemon = start_daemon(mnt / "guest")
            try:
                with SimVmm() as vmm:
                    vmm.connect(daemon.files.socket)
                    blk = block_window(vmm)
                    assert blk.request(VIRTIO_BLK_T_OUT, 4096, data).status == VIRTIO_BLK_S_OK
                    assert blk.request(VIRTIO_BLK_T_FLUSH, 0).status == VIRTIO_BLK_S_OK
                    daemon.proc.kill()  # type: ignore[union-attr]
                    daemon.proc.wait(10)  # type: ignore[union-attr]
                    snapshot = tmp_path / "snapshot.raw"
                    shutil.copyfile(disk, snapshot)  # the disk as a power cut would leave it
            finally:
                daemon.kill()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"loop device or mount unavailable: {exc.stderr!r}")
    with (_loop(snapshot) as dev, _mounted(dev, tmp_path / "after") as mnt,
          open(mnt / "guest" / "disk.img", "rb") as f):
        f.seek(4096 * 512)
        assert f.read(len(data)) == data
