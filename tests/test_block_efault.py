"""Guest memory the kernel cannot pin (Xen foreign mappings: VM_IO|VM_PFNMAP) makes zero-copy
preadv/pwritev into it fail with EFAULT. The device must then go through a bounce buffer."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from tests.test_block import SIZE, close, file_bytes, make
from tests.test_block_harness import io_engine  # noqa: F401  (the fixture)
from vmmiod.blockio import uring
from vmmiod.devices.block_request import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT

pytestmark = pytest.mark.usefixtures("io_engine")  # every test once per engine


UNMAPPED = 0x1000  # below vm.mmap_min_addr: never mapped in a process


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SIZE))
    return p


def refuse_guest_views(monkeypatch: pytest.MonkeyPatch, guest_buffers: list[Any]) -> list[int]:
    """Make preadv/pwritev fail with EFAULT whenever a view of guest memory is in the iovec."""
    refused = [0]
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def guarded(real: Any) -> Any:
        def call(fd: int, views: list[memoryview], offset: int, *a: Any) -> int:
            if any(v.obj is b for v in views for b in guest_buffers):
                refused[0] += 1
                raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
            return int(real(fd, views, offset, *a))
        return call

    monkeypatch.setattr(os, "preadv", guarded(real_preadv))
    monkeypatch.setattr(os, "pwritev", guarded(real_pwritev))
    # io_uring: the kernel itself refuses. A guest view is given to it at an address where
    # nothing is mapped (below vm.mmap_min_addr), so the read or write really fails with EFAULT.
    real_address = uring.buffer_address

    def address(view: memoryview) -> int:
        if any(view.obj is b for b in guest_buffers):
            refused[0] += 1
            return UNMAPPED
        return real_address(view)

    monkeypatch.setattr(uring, "buffer_address", address)
    return refused


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_efault_goes_through_a_bounce_buffer(image: Path, cache: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    dev, g = make(image, cache=cache)
    regions = g.mem.regions
    refused = refuse_guest_views(monkeypatch, [r.buf.obj for r in regions])
    r = g.run(VIRTIO_BLK_T_IN, 8, read=4096)
    assert r.status == VIRTIO_BLK_S_OK
    assert r.data == file_bytes(image, 8 * 512, 4096)
    data = os.urandom(8192)
    assert g.run(VIRTIO_BLK_T_OUT, 64, write=data).status == VIRTIO_BLK_S_OK
    assert file_bytes(image, 64 * 512, 8192) == data
    assert refused[0] >= 2  # the zero-copy path really was refused
    assert dev.counters["errors"] == 0
    close(dev, g)
