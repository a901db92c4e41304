"""virtio-blk against faults from real sources: a full tmpfs, a loop device over it, a
device-mapper error target; the image lock; host block devices."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_block_harness import Guest, io_engine, open_device  # noqa: F401
from vmmiod.devices.base import BackendError
from vmmiod.devices.block import BLK_CONFIG, VIRTIO_BLK_F_TOPOLOGY, BlockDevice
from vmmiod.devices.block_request import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)

pytestmark = pytest.mark.usefixtures("io_engine")  # every test once per engine

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, losetup, dmsetup)")


def close(dev: BlockDevice, g: Guest | None = None) -> None:
    if g is not None:
        g.close()
    asyncio.run(dev.close())


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    try:
        out = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                             capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no loop device: {exc}")
    dev = Path(out.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


# -- the image lock -------------------------------------------------------------------------------
def test_second_open_refuses_with_clear_message(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(65536))
    first = open_device(img)
    with pytest.raises(BackendError) as info:
        open_device(img, id="vdb")
    msg = str(info.value)
    assert "locked by another process" in msg and str(img) in msg and "vdb" in msg
    # Read-only sharers also conflict with a writer.
    with pytest.raises(BackendError):
        open_device(img, readonly=True)
    close(first)
    # Once the first closed, the image is free again; readers may share it.
    r1 = open_device(img, readonly=True)
    r2 = open_device(img, readonly=True)
    with pytest.raises(BackendError):
        open_device(img)
    close(r1)
    close(r2)
    unlocked = open_device(img, lock=False)  # explicit opt-out
    close(unlocked)


def test_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot open .*nothere.img"):
        open_device(tmp_path / "nothere.img")


# -- ENOSPC from a small tmpfs --------------------------------------------------------------------
@root_only
def test_enospc_fails_request_and_device_keeps_serving(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt", "256k") as mnt:
        img = mnt / "sparse.img"
        with open(img, "wb") as f:
            f.truncate(8 << 20)  # 8 MiB image on a 256 KiB filesystem
        dev = open_device(img)
        g = Guest(dev)
        statuses = [g.run(VIRTIO_BLK_T_OUT, i * 128, write=os.urandom(65536)).status
                    for i in range(16)]  # 1 MiB in total: the filesystem fills up
        assert statuses[0] == VIRTIO_BLK_S_OK
        assert VIRTIO_BLK_S_IOERR in statuses
        assert dev.counters["enospc"] >= 1 and dev.counters["io_errors"] >= 1
        assert dev.counters["errors"] == statuses.count(VIRTIO_BLK_S_IOERR)
        assert not g.transport.faults and not dev.failed
        # Still serving: what was written reads back, and a flush works.
        assert g.run(VIRTIO_BLK_T_IN, 0, read=512).status == VIRTIO_BLK_S_OK
        assert g.run(VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK
        close(dev, g)


# -- EIO ------------------------------------------------------------------------------------------
@root_only
def test_eio_from_loop_device_over_full_filesystem(tmp_path: Path) -> None:
    """A loop device whose backing filesystem is full: writeback fails with EIO at fdatasync.

    The flush fails, and every later flush fails too (after a failed fdatasync the kernel may
    have dropped the dirty pages: a later success would be a lie).
    """
    with small_tmpfs(tmp_path / "mnt", "512k") as mnt:
        back = mnt / "back.img"
        with open(back, "wb") as f:
            f.truncate(16 << 20)
        with loop_device(back) as loop:
            dev = open_device(loop)
            g = Guest(dev)
            for i in range(16):  # 1 MiB into the page cache: each write succeeds for now
                assert g.run(VIRTIO_BLK_T_OUT, i * 128, write=b"e" * 65536).status == \
                    VIRTIO_BLK_S_OK
            assert g.run(VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_IOERR
            assert dev.counters["eio"] >= 1
            assert g.run(VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_IOERR  # sticky
            assert dev.counters["errors"] == 2
            assert g.run(VIRTIO_BLK_T_IN, 2048, read=4096).status == VIRTIO_BLK_S_OK
            assert not dev.failed and not g.transport.faults
            g.close()
            asyncio.run(dev.close())  # the final fdatasync fails too: logged, no exception


def _dmsetup_works() -> str | None:
    try:
        r = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True, timeout=10,
                           check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"dmsetup not usable: {exc}"
    if r.returncode != 0 or "error" not in r.stdout:
        return ("device-mapper not available in this kernel "
                f"(dmsetup targets: {(r.stderr or r.stdout).strip().splitlines()[:1]})")
    return None


@root_only
def test_eio_from_device_mapper_error_target(tmp_path: Path) -> None:
    reason = _dmsetup_works()
    if reason is not None:
        pytest.skip(reason)
    name = f"vmmiod-test-{os.getpid()}"
    # 2048 good sectors from a loop device, then 2048 sectors of the `error` target.
    back = tmp_path / "good.img"
    back.write_bytes(bytes(1 << 20))
    with loop_device(back) as loop:
        table = f"0 2048 linear {loop} 0\n2048 2048 error\n"
        subprocess.run(["dmsetup", "create", name], input=table, text=True, check=True)
        try:
            dev = open_device(Path(f"/dev/mapper/{name}"), cache="none")
            g = Guest(dev)
            assert g.run(VIRTIO_BLK_T_IN, 0, read=4096).status == VIRTIO_BLK_S_OK
            assert g.run(VIRTIO_BLK_T_IN, 3000, read=4096).status == VIRTIO_BLK_S_IOERR
            assert g.run(VIRTIO_BLK_T_OUT, 3000, write=b"x" * 4096).status == \
                VIRTIO_BLK_S_IOERR
            assert dev.counters["eio"] >= 2
            assert g.run(VIRTIO_BLK_T_OUT, 8, write=b"y" * 4096).status == VIRTIO_BLK_S_OK
            assert not dev.failed
            close(dev, g)
        finally:
            subprocess.run(["dmsetup", "remove", name], check=False)


# -- host block devices ---------------------------------------------------------------------------
@root_only
def test_block_device_backing(tmp_path: Path) -> None:
    back = tmp_path / "blk.img"
    back.write_bytes(os.urandom(3 << 20))
    with loop_device(back) as loop:
        dev = open_device(loop, cache="none")
        g = Guest(dev)
        assert dev.backing.is_block_device
        assert BLK_CONFIG.unpack(dev.config_bytes())[0] == (3 << 20) // 512  # BLKGETSIZE64
        assert dev.device_features() >> VIRTIO_BLK_F_TOPOLOGY & 1
        assert BLK_CONFIG.unpack(dev.config_bytes())[6] == dev.backing.topology.logical
        data = os.urandom(16384)
        assert g.run(VIRTIO_BLK_T_OUT, 40, write=data).status == VIRTIO_BLK_S_OK
        assert g.run(VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK
        assert g.run(VIRTIO_BLK_T_IN, 40, read=16384).data == data
        close(dev, g)
        with open(back, "rb") as f:
            f.seek(40 * 512)
            assert f.read(16384) == data


@root_only
def test_write_zeroes_on_tmpfs_without_zero_range(tmp_path: Path) -> None:
    """tmpfs has no FALLOC_FL_ZERO_RANGE: zeroing falls back to punch + allocate."""
    from vmmiod.devices.block_request import VIRTIO_BLK_T_WRITE_ZEROES
    with small_tmpfs(tmp_path / "mnt", "8m") as mnt:
        img = mnt / "disk.img"
        img.write_bytes(os.urandom(1 << 20))
        dev = open_device(img)
        g = Guest(dev)
        blocks = os.stat(img).st_blocks
        assert g.run(VIRTIO_BLK_T_WRITE_ZEROES, ranges=[(128, 256, 0)]).status == \
            VIRTIO_BLK_S_OK
        assert img.read_bytes()[128 * 512:384 * 512] == bytes(256 * 512)
        assert os.stat(img).st_blocks == blocks  # zeroed, still allocated
        assert g.run(VIRTIO_BLK_T_WRITE_ZEROES, ranges=[(512, 256, 1)]).status == \
            VIRTIO_BLK_S_OK
        assert img.read_bytes()[512 * 512:768 * 512] == bytes(256 * 512)
        assert os.stat(img).st_blocks < blocks  # unmap allowed: a hole
        close(dev, g)


def test_status_byte_outside_guest_memory_faults_the_device(tmp_path: Path) -> None:
    """A read whose status byte lies outside guest memory: the read itself is done (its data
    buffer is real), then writing the status fails and the device asks for a reset (nothing of
    the batch is published). The counters add up: nothing is left in flight. The good read's
    status is written when its completion is handled before the bad one's (the thread engine
    completes them in either order; the device stops at the fault)."""
    from tests.test_block_harness import GPA, MEM_SIZE, UNWRITTEN
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    dev = open_device(img)
    g = Guest(dev)
    try:
        good = g.submit(VIRTIO_BLK_T_IN, 0, read=4096)
        hdr, data = g.header(VIRTIO_BLK_T_IN, 8), g.buf(4096)
        g.dq[0].add([(hdr, 16)], [(data, 4096), (GPA + MEM_SIZE + 4096, 1)], 999, None)
        g.kick()
        assert g.transport.faults  # the status write was refused: a reset is asked for
        status = g.mem.read(g.pending[good][2], 1)[0]
        assert status in (VIRTIO_BLK_S_OK, UNWRITTEN)
        assert not g.replies()  # nothing published
        assert dev.counters["in_flight"] == 0
        # The bad read is counted either way; the good one only when handled before the fault.
        assert dev.counters["bytes_read"] == (8192 if status == VIRTIO_BLK_S_OK else 4096)
    finally:
        close(dev, g)


def test_a_lone_read_whose_status_is_outside_memory_faults_the_device(tmp_path: Path) -> None:
    """Queue depth 1: a lone completion takes the short path of `_completed` (`_completed_one`),
    which keeps the batch path's rules: the status write is refused, the device asks for a
    reset, nothing is published, and the counters add up."""
    from tests.test_block_harness import GPA, MEM_SIZE
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    dev = open_device(img)
    g = Guest(dev)
    try:
        hdr, data = g.header(VIRTIO_BLK_T_IN, 8), g.buf(4096)
        g.dq[0].add([(hdr, 16)], [(data, 4096), (GPA + MEM_SIZE + 4096, 1)], 999, None)
        g.kick()
        assert g.transport.faults
        assert not g.replies()
        assert dev.counters["in_flight"] == 0
        assert dev.counters["bytes_read"] == 4096
        assert g.mem.read(data, 4096) == img.read_bytes()[8 * 512:8 * 512 + 4096]
    finally:
        close(dev, g)
