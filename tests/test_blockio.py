"""The block I/O engines (vmmiod/blockio/) against real files: every engine the same results."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_block_harness import uring_available
from vmmiod.blockio import CALL, FSYNC, READ, WRITE, Engine, Op, open_engine, uring, uring_engine

ENGINES = ("io_uring", "threads", "sync")
UNMAPPED = 0x1000  # below vm.mmap_min_addr: never mapped in a process


class Collector:
    def __init__(self) -> None:
        self.batches: list[list[Op]] = []

    def __call__(self, ops: list[Op]) -> None:
        self.batches.append(ops)

    @property
    def ops(self) -> list[Op]:
        return [op for b in self.batches for op in b]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Collector]]:
    if request.param == "io_uring" and not uring_available():
        pytest.skip("io_uring is not available on this machine")
    got = Collector()
    eng, fallback = open_engine(request.param, got)
    assert fallback is None and eng.name == request.param
    yield eng, got
    eng.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "img"
    p.write_bytes(os.urandom(1 << 20))
    return p


def buffers(n: int, size: int) -> tuple[mmap.mmap, list[memoryview]]:
    m = mmap.mmap(-1, n * size)
    mv = memoryview(m)
    return m, [mv[i * size:(i + 1) * size] for i in range(n)]


def test_reads_and_writes_in_one_batch(engine: tuple[Engine, Collector], image: Path) -> None:
    eng, got = engine
    fd = os.open(image, os.O_RDWR)
    before = image.read_bytes()
    m, views = buffers(40, 4096)
    for i in range(32):  # 32 reads at once, then 8 writes
        eng.submit(Op(READ, fd, [views[i]], i * 8192, 4096, owner=i))
    for i in range(8):
        views[32 + i][:] = bytes([i]) * 4096
        eng.submit(Op(WRITE, fd, [views[32 + i]], 512 * 1024 + i * 4096, 4096, owner=100 + i))
    eng.kick()  # no loop attached: waits, then delivers everything as one batch
    assert len(got.batches) == 1 and len(got.ops) == 40
    assert all(op.result == 4096 for op in got.ops)
    for i in range(32):
        assert bytes(views[i]) == before[i * 8192:i * 8192 + 4096]
    after = image.read_bytes()
    for i in range(8):
        assert after[512 * 1024 + i * 4096:][:4096] == bytes([i]) * 4096
    os.close(fd)
    views.clear()
    m.close()


def test_more_buffers_than_iov_max_and_end_of_file(engine: tuple[Engine, Collector],
                                                   image: Path) -> None:
    """1500 buffers: the kernel takes 1024 per call, the rest is a continued (short) transfer.
    A range running past the end of the file fails with EIO instead of returning zeros."""
    eng, got = engine
    fd = os.open(image, os.O_RDWR)
    m, views = buffers(1500, 512)
    data = os.urandom(1500 * 512)
    memoryview(m)[:] = data
    eng.submit(Op(WRITE, fd, views, 4096, len(data), owner="w"))
    eng.kick()
    assert image.read_bytes()[4096:4096 + len(data)] == data
    memoryview(m)[:] = bytes(len(data))
    eng.submit(Op(READ, fd, views, 4096, len(data), owner="r"))
    size = image.stat().st_size
    eng.submit(Op(READ, fd, views[:16], size - 4096, 8192, owner="eof"))
    eng.kick()
    res = {op.owner: op.result for op in got.ops}
    assert res == {"w": len(data), "r": len(data), "eof": -errno.EIO}
    assert bytes(m[:4096 * 0 + len(data)]) != bytes(len(data))
    os.close(fd)
    views.clear()
    m.close()


def test_barrier_waits_for_earlier_ops_and_holds_later_ones(
        engine: tuple[Engine, Collector], image: Path) -> None:
    """FLUSH's ordering: the fdatasync starts only after everything submitted before it has
    finished, and what comes after waits for it. Fails if the barrier is removed (the fsync
    would complete while the slow op is still running, and the later write would land)."""
    eng, got = engine
    fd = os.open(image, os.O_RDWR)
    release = threading.Event()
    m, views = buffers(1, 4096)
    views[0][:] = b"L" * 4096
    before = image.read_bytes()[:4096]

    async def main() -> None:
        eng.attach(asyncio.get_running_loop())
        eng.submit(Op(CALL, owner="slow", fn=lambda: release.wait(10)))
        eng.submit(Op(FSYNC, fd, owner="flush", barrier=True, mode=1))
        eng.submit(Op(WRITE, fd, views, 0, 4096, owner="later"))
        eng.kick()
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert got.ops == []  # nothing may finish while the slow op runs
        assert image.read_bytes()[:4096] == before  # the later write has not started
        release.set()
        while len(got.ops) < 3:
            await asyncio.sleep(0.001)
        eng.detach()

    asyncio.run(main())
    assert [op.owner for op in got.ops] == ["slow", "flush", "later"]
    assert image.read_bytes()[:4096] == b"L" * 4096
    os.close(fd)
    views.clear()
    m.close()


def test_efault_falls_back_to_a_bounce_buffer(engine: tuple[Engine, Collector], image: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory the kernel cannot pin (Xen foreign mappings) fails with EFAULT: the op is redone
    through a buffer of its own. io_uring: the kernel is handed an unmapped address for the
    guarded buffer and really fails; the thread engines: preadv/pwritev refuse it."""
    eng, got = engine
    m, views = buffers(2, 8192)
    refused = [0]
    real_preadv, real_pwritev, real_address = os.preadv, os.pwritev, uring.buffer_address

    def guarded(real: Any) -> Any:
        def call(fd: int, vs: list[memoryview], off: int) -> int:
            if any(v.obj is m for v in vs):
                refused[0] += 1
                raise OSError(errno.EFAULT, "Bad address")
            return int(real(fd, vs, off))
        return call

    def address(v: memoryview) -> int:
        if v.obj is m:
            refused[0] += 1
            return UNMAPPED
        return real_address(v)

    monkeypatch.setattr(os, "preadv", guarded(real_preadv))
    monkeypatch.setattr(os, "pwritev", guarded(real_pwritev))
    monkeypatch.setattr(uring, "buffer_address", address)
    for direct in (False, True):
        flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
        try:
            fd = os.open(image, flags)
        except OSError:
            continue  # no O_DIRECT on this filesystem
        data = os.urandom(8192)
        views[0][:] = data
        eng.submit(Op(WRITE, fd, [views[0]], 16384, 8192, owner="w", direct=direct))
        eng.kick()
        eng.submit(Op(READ, fd, [views[1]], 16384, 8192, owner="r", direct=direct))
        eng.kick()
        os.close(fd)
        assert [op.result for op in got.ops[-2:]] == [8192, 8192]
        assert bytes(views[1]) == data
        assert image.read_bytes()[16384:16384 + 8192] == data
    assert refused[0] >= 2
    views.clear()
    m.close()


def test_cancel_waits_and_delivers_nothing(engine: tuple[Engine, Collector],
                                           image: Path) -> None:
    """Reads in flight into 'guest memory', then cancel (a reset): when cancel returns nothing
    can write that memory any more, nothing is delivered, and no reference to it is held (the
    mapping can be closed at once)."""
    eng, got = engine
    try:
        fd = os.open(image, os.O_RDWR | os.O_DIRECT)
    except OSError:
        fd = os.open(image, os.O_RDWR)
    m, views = buffers(64, 4096)
    before: list[Op] = []

    async def main() -> None:
        eng.attach(asyncio.get_running_loop())
        for i in range(64):
            eng.submit(Op(READ, fd, [views[i]], (i * 37 % 256) * 4096, 4096, owner=i))
        eng.kick()  # (the sync engine has done its reads by now, and delivered them)
        before.extend(got.ops)
        eng.cancel(lambda op: True)
        memoryview(m)[:] = b"\xAA" * len(m)  # the guard pattern
        for _ in range(5):
            await asyncio.sleep(0.01)
        eng.detach()

    asyncio.run(main())
    assert got.ops == before  # nothing delivered after the cancel
    assert eng.in_flight == 0
    assert bytes(m) == b"\xAA" * len(m)  # nothing was written after the cancel
    views.clear()
    m.close()  # raises BufferError if the engine still held a view of it
    os.close(fd)


def test_call_exception_fails_its_op_only(engine: tuple[Engine, Collector]) -> None:
    """A blocking call that raises something other than OSError: its op fails with EIO and the
    error is kept; the engine keeps serving (issue 15 item 7)."""
    eng, got = engine

    def boom() -> None:
        raise ValueError("bug")

    eng.submit(Op(CALL, owner="bad", fn=boom))
    eng.submit(Op(CALL, owner="good", fn=lambda: None))
    eng.kick()
    res = {op.owner: (op.result, type(op.error).__name__) for op in got.ops}
    assert res == {"bad": (-errno.EIO, "ValueError"), "good": (0, "NoneType")}


def test_more_ops_than_ring_entries_in_one_batch(engine: tuple[Engine, Collector],
                                                 image: Path) -> None:
    """600 reads in one kick: io_uring's ring holds 256 entries, so the engine submits as it
    fills them; every read completes."""
    eng, got = engine
    fd = os.open(image, os.O_RDWR)
    before = image.read_bytes()
    m, views = buffers(600, 512)
    for i in range(600):
        eng.submit(Op(READ, fd, [views[i]], i * 1024, 512, owner=i))
    eng.kick()
    assert sorted(op.owner for op in got.ops) == list(range(600))
    assert all(op.result == 512 for op in got.ops)
    assert all(bytes(views[i]) == before[i * 1024:i * 1024 + 512] for i in range(600))
    os.close(fd)
    views.clear()
    got.batches.clear()
    m.close()


def test_write_from_read_only_memory(engine: tuple[Engine, Collector], image: Path) -> None:
    """A write's source may be read-only memory (a read-only guest region): the kernel gets
    its address all the same (io_uring's fast path cannot take a ctypes view of it)."""
    eng, got = engine
    fd = os.open(image, os.O_RDWR)
    try:
        data = os.urandom(4096)
        eng.submit(Op(WRITE, fd, [memoryview(data)], 8192, 4096, owner="w"))
        eng.kick()
        assert [op.result for op in got.ops] == [4096]
        assert image.read_bytes()[8192:8192 + 4096] == data
    finally:
        os.close(fd)


# -- io_uring: completions that no eventfd signal announces ---------------------------------------
def _uring_engine() -> tuple[Engine, Collector]:
    if not uring_available():
        pytest.skip("io_uring is not available on this machine")
    got = Collector()
    eng, _ = open_engine("io_uring", got)
    eng.nowait = False  # the ring's own paths: no buffered read is answered inline
    return eng, got


def _serve_until(eng: Engine, got: Collector, owner: object, setup: Any) -> None:
    """Attach to a loop, run `setup()` (no await in it), then run the loop until `owner` is
    delivered or 3 s pass."""
    async def main() -> None:
        eng.attach(asyncio.get_running_loop())
        setup()
        for _ in range(300):
            if any(op.owner == owner for op in got.ops):
                break
            await asyncio.sleep(0.01)
        eng.detach()

    asyncio.run(main())


def test_uring_overflowed_completions_are_reaped(image: Path) -> None:
    """The kernel keeps completions the CQ has no room for on its overflow list
    (IORING_SQ_CQ_OVERFLOW) and signals no eventfd for them; Linux 6.18 was seen to do so with a
    nearly empty CQ, and a guest's writes then waited forever (a vhost-user CI run). Here the CQ
    is overflowed with NOPs, then a read is submitted: its completion (forced onto the overflow
    list behind the NOPs) is delivered, and the flush is counted."""
    eng, got = _uring_engine()
    assert isinstance(eng, uring_engine.UringEngine)
    fd = os.open(image, os.O_RDONLY)
    m, views = buffers(1, 4096)
    ring = eng.ring

    def setup() -> None:
        rounds = ring.cq_entries // 200 + 1  # more NOPs than the CQ holds, 200 per submit
        for _ in range(rounds):
            for _ in range(200):
                ring.prep_nop(0)  # tag 0: a completion with no op (as a cancel's own)
            ring.submit()
        eng._owed += rounds * 200  # completions the engine is owed
        assert ring.cq_overflowed()
        eng.submit(Op(READ, fd, [views[0]], 8192, 4096, owner="read"))
        eng.kick()

    try:
        _serve_until(eng, got, "read", setup)
        assert [(op.owner, op.result) for op in got.ops] == [("read", 4096)]
        assert bytes(views[0]) == image.read_bytes()[8192:12288]
        assert eng.overflow_flushes >= 1 and not ring.cq_overflowed()
    finally:
        eng.close()
        os.close(fd)
        views.clear()
        m.close()


def test_uring_watchdog_reaps_a_completion_without_wakeup(image: Path) -> None:
    """A completion in the ring whose eventfd signal never reached the loop (what an overflow
    amounts to) is reaped by the watchdog within its period, and counted."""
    eng, got = _uring_engine()
    assert isinstance(eng, uring_engine.UringEngine)
    fd = os.open(image, os.O_RDONLY)
    m, views = buffers(1, 4096)

    def setup() -> None:
        eng.submit(Op(READ, fd, [views[0]], 0, 4096, owner="read"))
        eng.kick()
        for _ in range(3000):
            if eng.ring.cq_ready():
                break
            time.sleep(0.001)
        os.eventfd_read(eng.efd)  # the wake-up is lost

    try:
        _serve_until(eng, got, "read", setup)
        assert [(op.owner, op.result) for op in got.ops] == [("read", 4096)]
        assert eng.missed_wakeups == 1
    finally:
        eng.close()
        os.close(fd)
        views.clear()
        m.close()


def test_uring_direct_ops_reach_the_kernel_before_the_kick(image: Path) -> None:
    """O_DIRECT reads go to the kernel every SUBMIT_EVERY entries as they are queued (the disk
    starts while the device parses the rest); buffered ones wait for the kick; either way every
    op completes once, with its data."""
    eng, got = _uring_engine()
    assert isinstance(eng, uring_engine.UringEngine)
    every = uring_engine.SUBMIT_EVERY
    try:
        dfd = os.open(image, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        eng.close()
        pytest.skip("no O_DIRECT on this filesystem")
    bfd = os.open(image, os.O_RDONLY)
    m, views = buffers(2 * every + 2, 4096)
    try:
        for i in range(every + 1):
            eng.submit(Op(READ, dfd, [views[i]], i * 4096, 4096, owner=i, direct=True))
        assert eng.ring.pending() == 1  # the first `every` were submitted at once
        for i in range(every + 1, 2 * every + 2):
            eng.submit(Op(READ, bfd, [views[i]], i * 4096, 4096, owner=i))
        assert eng.ring.pending() == every + 2  # buffered: not before the kick
        eng.kick()
        assert eng.ring.pending() == 0
        assert sorted(op.owner for op in got.ops) == list(range(2 * every + 2))
        data = image.read_bytes()
        for i in range(2 * every + 2):
            assert bytes(views[i]) == data[i * 4096:(i + 1) * 4096]
    finally:
        eng.close()
        os.close(dfd)
        os.close(bfd)
        views.clear()
        m.close()


@pytest.mark.parametrize("name", ["io_uring", "threads"])
def test_cached_buffered_read_is_answered_inline(name: str, image: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A buffered read the page cache holds in full is done at submit (preadv2 RWF_NOWAIT): no
    SQE, no worker, delivered with the batch at the kick. One the cache cannot answer at once
    (EAGAIN, a short count) takes the engine's usual path from the start, and misses back off
    (1, then 2 reads not tried; a hit halves the back-off); a kernel without RWF_NOWAIT
    (EOPNOTSUPP) is not asked again. Either way the data is the file's."""
    if name == "io_uring" and not uring_available():
        pytest.skip("io_uring is not available on this machine")
    from vmmiod.blockio import inline
    got = Collector()
    eng, _ = open_engine(name, got)
    fd = os.open(image, os.O_RDWR)
    data = image.read_bytes()  # (and the file is in the page cache: it was just written)
    m, views = buffers(10, 4096)
    answers: list[int] = []  # for the inline attempts: a byte count, or -errno
    tried: list[int] = []
    real = os.preadv

    def preadv(fd: int, bufs: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags:  # an inline attempt
            tried.append(offset // 4096 - 1)
            if answers:  # answered as the test says
                a = answers.pop(0)
                if a < 0:
                    raise OSError(-a, os.strerror(-a))
                return int(real(fd, [bufs[0][:a]], offset))  # a short count
        return int(real(fd, bufs, offset, flags))

    def read(i: int) -> None:
        eng.submit(Op(READ, fd, [views[i]], 4096 * (i + 1), 4096, owner=i))

    monkeypatch.setattr(inline.os, "preadv", preadv)
    try:
        read(0)
        assert eng.in_flight == 0 and eng.inline_reads == 1  # done, before any kick
        if isinstance(eng, uring_engine.UringEngine):
            assert eng.ring.pending() == 0
        answers[:] = [-errno.EAGAIN, 1024]  # not cached at once; later only part of it
        for i in range(1, 7):
            read(i)
        # 1 missed, 2 not tried, 3 short, 4 and 5 not tried, 6 a hit.
        assert tried == [0, 1, 3, 6] and eng.inline_reads == 2 and eng.nowait
        answers[:] = [-errno.EOPNOTSUPP]
        for i in range(7, 10):
            read(i)
        assert tried == [0, 1, 3, 6, 7] and not eng.nowait  # not asked again
        eng.kick()
        assert sorted((op.owner, op.result) for op in got.ops) == [(i, 4096) for i in range(10)]
        for i in range(10):
            assert bytes(views[i]) == data[4096 * (i + 1):4096 * (i + 2)]
    finally:
        eng.close()
        os.close(fd)
        views.clear()
        m.close()


def test_a_buffered_read_the_page_cache_misses_starts_in_a_worker(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """io_uring: a buffered read the inline attempt could not answer goes to the ring with
    IOSQE_ASYNC, so the kernel starts it in an io-wq worker and never reads (nor starts the
    readahead of) a cold page inside io_uring_enter, on the loop's thread
    (docs/performance.md, round 6: the cold-writeback loop stall). Buffered writes keep the
    kernel's own non-blocking attempt. Either way the data is right."""
    if not uring_available():
        pytest.skip("io_uring is not available on this machine")
    from vmmiod.blockio import inline
    got = Collector()
    eng, _ = open_engine("io_uring", got)
    assert isinstance(eng, uring_engine.UringEngine)
    fd = os.open(image, os.O_RDWR)
    data = image.read_bytes()
    m, views = buffers(3, 4096)
    real = os.preadv

    def preadv(fd: int, bufs: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags:  # every inline attempt misses, as on a cold cache
            raise BlockingIOError(errno.EAGAIN, "cold")
        return int(real(fd, bufs, offset, flags))

    def last_sqe_flags() -> int:
        ring = eng.ring
        return ring.sqes[((ring._tail - 1) & ring.sq_mask) * uring.SQE_SIZE + 1]

    monkeypatch.setattr(inline.os, "preadv", preadv)
    try:
        eng.submit(Op(READ, fd, [views[0]], 8192, 4096, owner="read"))
        assert last_sqe_flags() & uring.IOSQE_ASYNC  # without it: 0
        views[1][:] = b"\x5a" * 4096
        eng.submit(Op(WRITE, fd, [views[1]], 65536, 4096, owner="write"))
        assert not last_sqe_flags() & uring.IOSQE_ASYNC
        eng.kick()
        assert sorted((op.owner, op.result) for op in got.ops) == [("read", 4096),
                                                                  ("write", 4096)]
        assert bytes(views[0]) == data[8192:12288]
        assert os.pread(fd, 4096, 65536) == b"\x5a" * 4096
    finally:
        eng.close()
        os.close(fd)
        views.clear()
        m.close()


def test_read_behind_a_barrier_is_not_answered_inline(engine: tuple[Engine, Collector],
                                                      image: Path) -> None:
    """FLUSH's ordering holds for inline reads too: a read submitted after a barrier that is
    still waiting starts only after it, even when the page cache could answer it at once."""
    eng, got = engine
    fd = os.open(image, os.O_RDWR)
    release = threading.Event()
    m, views = buffers(1, 4096)

    async def main() -> None:
        eng.attach(asyncio.get_running_loop())
        eng.submit(Op(CALL, owner="slow", fn=lambda: release.wait(10)))
        eng.submit(Op(FSYNC, fd, owner="flush", barrier=True, mode=1))
        eng.submit(Op(READ, fd, views, 0, 4096, owner="read"))
        eng.kick()
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert got.ops == [] and eng.inline_reads == 0
        release.set()
        while len(got.ops) < 3:
            await asyncio.sleep(0.001)
        eng.detach()

    asyncio.run(main())
    assert [op.owner for op in got.ops] == ["slow", "flush", "read"]
    assert bytes(views[0]) == image.read_bytes()[:4096]
    os.close(fd)
    views.clear()
    m.close()
