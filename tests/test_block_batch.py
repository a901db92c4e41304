"""virtio-blk's batch fast path (vmmiod/devices/block_fast.py): a notification's requests in one
pass must complete exactly as one by one, whatever the rest of the batch holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_block_harness import (  # noqa: F401  (io_engine: the fixture)
    UNWRITTEN,
    Guest,
    io_engine,
    open_device,
)
from vmmiod.devices.block import BlockDevice
from vmmiod.devices.block_request import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)

pytestmark = pytest.mark.usefixtures("io_engine")  # every test once per engine

SECTORS = 2048
SIZE = SECTORS * 512


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SIZE))
    return p


def make(image: Path, queue_size: int = 8, **kw: object) -> tuple[BlockDevice, Guest]:
    dev = open_device(image, queue_size=queue_size, **kw)
    return dev, Guest(dev, queue_size=queue_size)


def test_batch_with_bad_requests_in_the_middle_fails_only_those(image: Path) -> None:
    dev, g = make(image, queue_size=16)
    content = image.read_bytes()
    tokens = {}
    for i in range(10):
        if i == 3:
            tokens[i] = g.submit(VIRTIO_BLK_T_IN, SECTORS - 1, read=4096)  # past the end
        elif i == 5:
            tokens[i] = g.submit(99, 0, read=512)  # an unknown type
        elif i == 7:
            tokens[i] = g.submit(VIRTIO_BLK_T_IN, 8, read=100)  # not a multiple of 512
        else:
            tokens[i] = g.submit(VIRTIO_BLK_T_IN, 8 * i, read=4096)
    g.kick()
    replies = g.replies()
    assert len(replies) == 10
    for i, t in tokens.items():
        r = replies[t]
        if i in (3, 7):
            assert r.status == VIRTIO_BLK_S_IOERR
        elif i == 5:
            assert r.status == VIRTIO_BLK_S_UNSUPP
        else:
            assert r.status == VIRTIO_BLK_S_OK
            assert r.data == content[8 * i * 512:8 * i * 512 + 4096]
            assert r.used_len == 4097
    assert dev.counters["malformed"] == 2
    assert dev.counters["requests_unsupported"] == 1
    assert dev.counters["requests_in"] == 7
    assert dev.counters["in_flight"] == 0
    g.close()


@pytest.mark.parametrize("cache", ["writeback", "writethrough", "none"])
def test_batches_wrap_the_rings(image: Path, cache: str) -> None:
    """Queue of 8: a batch of 5, then batches of 8 that wrap the avail and used rings inside
    the batch, reads and writes mixed; every request's data and status as one by one (O_DIRECT
    with `cache: none`, an fdatasync before each write's status with writethrough)."""
    dev, g = make(image, cache=cache)
    content = bytearray(image.read_bytes())
    rounds = [5, 8, 8, 3, 8]
    n = 0
    for count in rounds:
        tokens = []
        for _ in range(count):
            sector = (n * 13) % (SECTORS - 8)
            if n % 3 == 0:
                data = os.urandom(1024)
                tokens.append((g.submit(VIRTIO_BLK_T_OUT, sector, write=data), sector, data))
                content[sector * 512:sector * 512 + 1024] = data
            else:
                tokens.append((g.submit(VIRTIO_BLK_T_IN, sector, read=1024), sector, None))
            n += 1
        g.kick()
        replies = g.replies()
        assert len(replies) == count
        for t, sector, data in tokens:
            r = replies[t]
            assert r.status == VIRTIO_BLK_S_OK
            if data is None:
                assert r.data == bytes(content[sector * 512:sector * 512 + 1024])
                assert r.used_len == 1025
            else:
                assert r.used_len == 1
    assert image.read_bytes() == bytes(content)
    assert dev.counters["in_flight"] == 0
    if cache == "writethrough":
        assert dev.counters["flushes"] >= 1
    g.close()


def test_hostile_avail_entry_in_the_middle_resets_the_device(image: Path) -> None:
    dev, g = make(image)
    tokens = [g.submit(VIRTIO_BLK_T_IN, 8 * i, read=512) for i in range(4)]
    dq = g.dq[0]
    dq.kick_prepare()
    dq.raw_avail(dq.avail_idx - 2, 200)  # the third entry names no descriptor
    dev.queue_notify(0)
    assert g.transport.faults and "200" in g.transport.faults[0]
    assert dev.failed
    st = g.pending[tokens[3]][2]
    assert g.mem.read(st, 1)[0] == UNWRITTEN  # nothing after the bad entry was done
    g.close()


def test_read_only_device_refuses_writes_inside_a_batch(image: Path) -> None:
    _dev, g = make(image, readonly=True)
    before = image.read_bytes()
    t1 = g.submit(VIRTIO_BLK_T_IN, 0, read=512)
    t2 = g.submit(VIRTIO_BLK_T_OUT, 0, write=b"x" * 512)
    t3 = g.submit(VIRTIO_BLK_T_IN, 1, read=512)
    g.kick()
    replies = g.replies()
    assert replies[t1].status == replies[t3].status == VIRTIO_BLK_S_OK
    assert replies[t2].status == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before
    g.close()


@pytest.mark.parametrize("event_idx", [True, False])
def test_one_chain_per_notification_reads_avail_idx_once_and_still_sees_late_chains(
        image: Path, event_idx: bool) -> None:
    """QD1: the chain's own read of avail.idx is the last one before enable_notification's
    re-read behind the fence (no pop that finds nothing); a chain the driver adds while the
    device handles the first, without a notification, is still found by that re-read."""
    dev = open_device(image, queue_size=8)
    g = Guest(dev, queue_size=8, event_idx=event_idx)
    q = dev.queues[0]
    pops: list[bool] = []
    real_pop = q.pop

    def counting_pop() -> object:
        chain = real_pop()
        pops.append(chain is not None)
        return chain

    q.pop = counting_pop  # type: ignore[method-assign]
    t1 = g.submit(VIRTIO_BLK_T_IN, 0, read=512)
    g.kick()
    assert g.replies()[t1].status == VIRTIO_BLK_S_OK
    assert pops == [True]  # without the drained() check: [True, False]

    pops.clear()
    late: list[int] = []
    real_handle = dev._handle

    def handle_and_add(*args: object) -> None:
        real_handle(*args)  # type: ignore[arg-type]
        if not late:  # the driver adds a chain meanwhile and, suppressed, does not notify
            late.append(g.submit(VIRTIO_BLK_T_IN, 8, read=512))

    dev._handle = handle_and_add  # type: ignore[method-assign]
    t2 = g.submit(VIRTIO_BLK_T_IN, 0, read=512)
    g.kick()
    replies = g.replies()
    assert replies[t2].status == replies[late[0]].status == VIRTIO_BLK_S_OK
    assert pops == [True, True]
    assert replies[late[0]].data == image.read_bytes()[8 * 512:9 * 512]
    g.close()


def test_a_lone_request_goes_to_the_kernel_before_notifications_are_enabled_again(
        image: Path) -> None:
    """QD1: once the notification's only chain is handled, its op is handed to the kernel
    (`Engine.flush`) before the device re-enables notifications and ends the batch: the disk
    starts on it without waiting for that bookkeeping (docs/performance.md, round 5)."""
    dev = open_device(image, queue_size=8)
    g = Guest(dev, queue_size=8)
    q = dev.queues[0]
    engine = dev.engine
    assert engine is not None
    order: list[str] = []
    real_flush, real_enable = engine.flush, q.enable_notification

    def flush() -> None:
        order.append("flush")
        real_flush()

    def enable() -> bool:
        ring = getattr(engine, "ring", None)  # io_uring: every queued SQE is the kernel's now
        order.append("enable" if ring is None or not ring.pending() else "enable-unsubmitted")
        return real_enable()

    engine.flush = flush  # type: ignore[method-assign]
    q.enable_notification = enable  # type: ignore[method-assign]
    t = g.submit(VIRTIO_BLK_T_OUT, 0, write=b"\xa5" * 512)
    g.kick()
    assert g.replies()[t].status == VIRTIO_BLK_S_OK
    assert order == ["flush", "enable"]  # without the early flush: ["enable"]
    assert image.read_bytes()[:512] == b"\xa5" * 512
    g.close()


def ten_reads_in_one_notification(image: Path, g: Guest) -> None:
    """Ten 4 KiB reads in one notification, each checked: status, used length, the file's data."""
    content = image.read_bytes()
    tokens = {g.submit(VIRTIO_BLK_T_IN, 8 * i, read=4096): i for i in range(10)}
    g.kick()
    replies = g.replies()
    assert len(replies) == 10
    for t, i in tokens.items():
        r = replies[t]
        assert r.status == VIRTIO_BLK_S_OK and r.used_len == 4097
        assert r.data == content[8 * i * 512:8 * i * 512 + 4096]


def test_cached_reads_of_a_batch_are_answered_without_an_engine_op(image: Path) -> None:
    """A notification's buffered reads the page cache holds (the image was just written) are
    answered by the batch path itself, with one preadv2(RWF_NOWAIT) each: no request, op or
    engine round (docs/performance.md, round 6). Only the notification's first chain, popped
    one by one, meets the engine (which answers it inline too). The sync engine reads inline
    anyway and tries nothing."""
    dev, g = make(image, queue_size=16)
    engine = dev.engine
    assert engine is not None
    submitted: list[int] = []
    real_submit = engine.submit

    def submit(op: object) -> None:
        submitted.append(1)
        real_submit(op)  # type: ignore[arg-type]

    engine.submit = submit  # type: ignore[method-assign]
    ten_reads_in_one_notification(image, g)
    c = dev.counters
    assert (c["requests_in"], c["bytes_read"], c["in_flight"]) == (10, 40960, 0)
    if engine.name == "sync":
        assert len(submitted) == 10 and dev.stats()["io_inline_reads"] == 0
    else:
        assert len(submitted) == 1  # without the batch path's own answer: 10
        assert dev.stats()["io_inline_reads"] == 10
    g.close()


def test_a_batch_of_page_cache_misses_backs_off_as_one_by_one(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads the page cache cannot answer (every RWF_NOWAIT attempt misses, here by a stand-in
    for preadv) go to the engine and complete there; the batch path and the engine share one
    back-off, so a miss is never tried twice: of 10 reads the 1st, 3rd and 6th are tried (the
    back-off 1, 2, 4 after each miss), as the engine alone does it."""
    from vmmiod.blockio import inline

    dev, g = make(image, queue_size=16)
    engine = dev.engine
    assert engine is not None
    if engine.name == "sync":
        pytest.skip("the sync engine tries no read inline")
    tried: list[int] = []
    real_preadv = os.preadv

    def preadv(fd: int, views: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags & inline.RWF_NOWAIT:
            tried.append(offset // 4096)
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_preadv(fd, views, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    ten_reads_in_one_notification(image, g)
    assert tried == [0, 2, 5]  # each miss counted twice (no shared back-off): [0, 2, 4, 8]
    assert dev.stats()["io_inline_reads"] == 0
    assert dev.counters["in_flight"] == 0
    g.close()
