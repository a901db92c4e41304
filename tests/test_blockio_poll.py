"""Bounded adaptive polling of the io_uring completion ring (vmmiod/blockio/poll.py)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.test_block_harness import uring_available
from tests.test_blockio import Collector, buffers
from vmmiod.blockio import READ, Op, open_engine, uring, uring_engine
from vmmiod.blockio.poll import GROW_START, POLL_MAX_NS, AdaptivePoll


def test_window_grows_while_completions_come_within_the_bound() -> None:
    p = AdaptivePoll(50_000)
    assert p.window == 0  # no polling until a completion shows it would pay
    p.waited(30_000)
    assert p.window == GROW_START
    seen = []
    for _ in range(6):
        p.waited(30_000)
        seen.append(p.window)
    assert seen == [8_000, 16_000, 32_000, 32_000, 32_000, 32_000]  # found inside: kept
    p.waited(45_000)
    assert p.window == 50_000  # never above the bound
    p.waited(49_000)
    assert p.window == 50_000


def test_window_shrinks_to_nothing_when_completions_come_later_than_the_bound() -> None:
    p = AdaptivePoll(50_000)
    p.window = 50_000
    seen = []
    for _ in range(5):
        p.waited(200_000)
        seen.append(p.window)
    assert seen == [25_000, 12_500, 6_250, 0, 0]


def test_bound_zero_never_polls_and_costs_are_counted() -> None:
    p = AdaptivePoll(0)
    for _ in range(3):
        p.waited(1_000)
    assert p.window == 0
    p.polled(700, True)
    p.polled(300, False)
    assert (p.hits, p.misses, p.spent_ns) == (1, 1, 1_000)
    assert AdaptivePoll().max_ns == POLL_MAX_NS


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "img"
    p.write_bytes(os.urandom(1 << 16))
    return p


def _run(image: Path, count: int, window: int, max_ns: int = POLL_MAX_NS, direct: bool = True
         ) -> tuple[uring_engine.UringEngine, Collector, bytes]:
    """Submit `count` 4 KiB reads (O_DIRECT unless told) on a loop with the poll window forced;
    serve them."""
    if not uring_available():
        pytest.skip("io_uring is not available on this machine")
    try:
        fd = os.open(image, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        pytest.skip("no O_DIRECT on this filesystem")
    got = Collector()
    eng, _ = open_engine("io_uring", got)
    assert isinstance(eng, uring_engine.UringEngine)
    eng.nowait = False  # through the ring, not answered inline
    assert eng.poll is not None
    eng.poll.max_ns = max_ns
    eng.poll.window = window
    m, views = buffers(count, 4096)

    async def main() -> None:
        eng.attach(asyncio.get_running_loop())
        for i in range(count):
            eng.submit(Op(READ, fd, [views[i]], i * 4096, 4096, owner=i, direct=direct))
        eng.kick()
        for _ in range(300):
            if len(got.ops) == count:
                break
            await asyncio.sleep(0.01)
        eng.detach()

    try:
        asyncio.run(main())
        data = b"".join(bytes(v) for v in views)
    finally:
        eng.close()
        os.close(fd)
        views.clear()
        m.close()
    return eng, got, data


def test_a_shallow_queue_is_polled_and_every_completion_delivered_once(image: Path) -> None:
    eng, got, data = _run(image, 1, POLL_MAX_NS)
    assert [(op.owner, op.result) for op in got.ops] == [(0, 4096)]
    assert data == image.read_bytes()[:4096]
    assert eng.poll.hits + eng.poll.misses <= 1  # at most one poll, found or not: bounded


def test_a_completion_inside_the_window_is_reaped_by_the_poll(image: Path) -> None:
    """A window far longer than the read (a test's bound, not the daemon's): the poll finds it."""
    eng, got, data = _run(image, 1, 10**10, max_ns=10**10)
    assert [(op.owner, op.result) for op in got.ops] == [(0, 4096)]
    assert data == image.read_bytes()[:4096]
    # (1, 0) unless the loop's epoll saw the eventfd first, when the poll finds nothing owed
    assert (eng.poll.hits, eng.poll.misses) in ((1, 0), (0, 0))


def test_a_window_that_has_ended_is_a_miss_and_the_eventfd_delivers(image: Path) -> None:
    eng, got, data = _run(image, 1, 1)
    assert [(op.owner, op.result) for op in got.ops] == [(0, 4096)]
    assert data == image.read_bytes()[:4096]
    assert (eng.poll.hits, eng.poll.misses) in ((0, 1), (0, 0))  # (as above)


def test_a_deep_queue_is_not_polled(image: Path) -> None:
    n = uring_engine.POLL_DEPTH + 1
    eng, got, data = _run(image, n, POLL_MAX_NS)
    assert sorted(op.owner for op in got.ops) == list(range(n))
    assert data == image.read_bytes()[:n * 4096]
    assert eng.poll.hits + eng.poll.misses == 0


def test_buffered_ops_are_not_polled(image: Path) -> None:
    """A buffered op the page cache cannot answer runs on an io-wq worker thread: a poll would
    take the CPU that thread needs."""
    eng, got, data = _run(image, 1, POLL_MAX_NS, direct=False)
    assert [(op.owner, op.result) for op in got.ops] == [(0, 4096)]
    assert data == image.read_bytes()[:4096]
    assert eng.poll.hits + eng.poll.misses == 0


def test_polling_off(image: Path) -> None:
    eng, got, _ = _run(image, 1, 0, max_ns=0)
    assert len(got.ops) == 1
    assert eng.poll.hits + eng.poll.misses == 0


@pytest.mark.parametrize("us", [0, 20, 50])
def test_the_block_config_sets_the_bound(image: Path, us: int) -> None:
    from tests.test_block_harness import open_device

    if not uring_available():
        pytest.skip("io_uring is not available on this machine")
    dev = open_device(image, io_engine="io_uring", io_poll_us=us)
    try:
        assert isinstance(dev.engine, uring_engine.UringEngine)
        assert dev.engine.poll.max_ns == us * 1000
        assert dev.stats()["io_poll_us"] == 0
    finally:
        asyncio.run(dev.close())


def _quiet_setup(image: Path) -> tuple[uring_engine.UringEngine, Collector, int, object, list]:
    if not uring_available():
        pytest.skip("io_uring is not available on this machine")
    try:
        fd = os.open(image, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("no O_DIRECT on this filesystem")
    got = Collector()
    eng, _ = open_engine("io_uring", got, poll_max_ns=10**10)
    assert isinstance(eng, uring_engine.UringEngine)
    if not eng.ring.eventfd_switch:
        eng.close()
        os.close(fd)
        pytest.skip("this kernel's io_uring has no IORING_CQ_EVENTFD_DISABLED (Linux 5.8)")
    eng.nowait = False
    eng.poll.window = 10**10  # a test's bound: the poll always outlasts the read
    m, views = buffers(1, 4096)
    return eng, got, fd, m, views


def _eventfd_count(efd: int) -> int:
    try:
        return os.eventfd_read(efd)
    except BlockingIOError:
        return 0


def _cq_quiet(eng: uring_engine.UringEngine) -> bool:
    ring = eng.ring
    return bool(uring.U32.unpack_from(ring.cq, ring._cq_flags_off)[0]
                & uring.IORING_CQ_EVENTFD_DISABLED)


def _wait_cq(eng: uring_engine.UringEngine) -> None:
    deadline = time.monotonic() + 10
    while not eng.ring.cq_ready():
        assert time.monotonic() < deadline, "the read never completed"


def test_a_polled_completion_signals_no_eventfd(image: Path) -> None:
    """While a poll is scheduled, the ring's eventfd signals are off: the completion the poll
    reaps costs no eventfd read (a system call per request at queue depth 1); they are back on
    once the poll has run."""
    eng, got, fd, m, views = _quiet_setup(image)

    async def main() -> None:
        eng.attach(asyncio.get_running_loop())
        eng.submit(Op(READ, fd, [views[0]], 0, 4096, owner=0, direct=True))
        eng.kick()
        assert _cq_quiet(eng)  # off before the submission: its completion signals nothing
        for _ in range(300):
            if got.ops:
                break
            await asyncio.sleep(0.01)
        assert not _cq_quiet(eng)
        assert _eventfd_count(eng.efd) == 0
        eng.detach()

    try:
        asyncio.run(main())
        assert [(op.owner, op.result) for op in got.ops] == [(0, 4096)]
        assert bytes(views[0]) == image.read_bytes()[:4096]
        assert (eng.poll.hits, eng.poll.misses, eng.missed_wakeups) == (1, 0, 0)
    finally:
        eng.close()
        os.close(fd)
        views.clear()
        m.close()


@pytest.mark.parametrize("how", ["poll_ends", "detach"])
def test_a_completion_while_the_eventfd_is_quiet_is_never_lost(image: Path, how: str) -> None:
    """A completion posted while the signals are off, found by no poll: the poll that ends
    without it looks at the ring once more after turning them back on (poll_ends); a detach
    with one there signals the eventfd itself (detach). Without either, it waits for the
    watchdog (50 ms, counted in missed_wakeups) or for ever."""
    eng, got, fd, m, views = _quiet_setup(image)

    async def main() -> None:
        eng.attach(asyncio.get_running_loop())
        eng.submit(Op(READ, fd, [views[0]], 0, 4096, owner=0, direct=True))
        eng.kick()
        assert _cq_quiet(eng)
        _wait_cq(eng)  # completed, and signalled nothing
        if how == "poll_ends":
            eng._poll_from = 1  # the poll's window ended long ago: it will find nothing
            for _ in range(3):
                await asyncio.sleep(0)
            assert [(op.owner, op.result) for op in got.ops] == [(0, 4096)]
            assert (eng.poll.hits, eng.poll.misses, eng.missed_wakeups) == (0, 1, 0)
            eng.detach()
        else:
            eng.detach()
            assert not _cq_quiet(eng)
            assert _eventfd_count(eng.efd) == 1

    try:
        asyncio.run(main())
    finally:
        eng.close()
        os.close(fd)
        views.clear()
        m.close()
