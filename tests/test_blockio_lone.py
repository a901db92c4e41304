"""A lone io_uring completion handed to the owner's hook first (vmmiod/blockio/lone.py), and
every case that must take the general path instead, against a real ring and a real file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.test_block_harness import uring_available
from tests.test_blockio import Collector, buffers, image  # noqa: F401  (fixture)
from vmmiod.blockio import READ, Op, open_engine
from vmmiod.blockio.uring_engine import UringEngine


class Hook:
    """The owner's `lone` hook: what the engine looked like when it was called."""

    def __init__(self, eng: UringEngine, answer: bool = True, cancel: bool = False) -> None:
        self.eng, self.answer, self.cancel = eng, answer, cancel
        self.seen: list[tuple[Op, int, bool, int]] = []

    def __call__(self, op: Op) -> bool:
        e = self.eng
        self.seen.append((op, op.result, op in e._live, len(e._tags)))
        if self.cancel:  # what a device reset does from inside the hook (a guest fault)
            e.cancel(lambda _op: True)
        return self.answer


def ring_engine(**hook: bool) -> tuple[UringEngine, Collector, Hook]:
    if not uring_available():
        pytest.skip("io_uring is not available on this machine")
    got = Collector()
    eng, _ = open_engine("io_uring", got)
    assert isinstance(eng, UringEngine)
    eng.nowait = False  # no buffered read answered inline: every read goes through the ring
    h = Hook(eng, **hook)
    eng.lone = h
    return eng, got, h


def wake(eng: UringEngine, completions: int) -> None:
    """Hand what is queued to the kernel, wait (bounded) until the ring holds `completions`
    CQEs, then run the eventfd's reader callback, as the loop would."""
    eng.flush()
    for _ in range(2000):
        if eng.ring.cq_ready() >= completions:
            break
        time.sleep(0.001)
    assert eng.ring.cq_ready() == completions
    eng._on_readable()


def read_op(fd: int, view: memoryview, offset: int, owner: object) -> Op:
    return Op(READ, fd, [view], offset, len(view), owner)


def test_a_lone_completion_goes_to_the_hook_before_the_engine_books_it(image: Path) -> None:  # noqa: F811
    eng, got, hook = ring_engine()
    fd = os.open(image, os.O_RDONLY)
    try:
        _m, views = buffers(1, 4096)
        op = read_op(fd, views[0], 8192, "a")
        eng.submit(op)
        wake(eng, 1)
        # Answered first: the hook saw the result while the op was still the engine's.
        assert hook.seen == [(op, 4096, True, 1)]
        assert bytes(views[0]) == image.read_bytes()[8192:8192 + 4096]
        assert got.batches == []  # not delivered a second time
        assert (eng.in_flight, eng._live, eng._tags, eng._owed, eng.ring.cq_ready()) == (
            0, set(), {}, 0, 0)
        assert op.views == [] and op.keep is None
    finally:
        eng.close()
        os.close(fd)


def test_a_declined_lone_completion_is_delivered_as_usual(image: Path) -> None:  # noqa: F811
    eng, got, hook = ring_engine(answer=False)
    fd = os.open(image, os.O_RDONLY)
    try:
        _m, views = buffers(1, 4096)
        op = read_op(fd, views[0], 0, "a")
        eng.submit(op)
        wake(eng, 1)
        assert [o for o, *_ in hook.seen] == [op]
        assert got.batches == [[op]] and op.result == 4096
        assert (eng.in_flight, eng._tags, eng.ring.cq_ready()) == (0, {}, 0)
    finally:
        eng.close()
        os.close(fd)


def test_two_completions_in_one_wake_up_take_the_general_path(image: Path) -> None:  # noqa: F811
    eng, got, hook = ring_engine()
    fd = os.open(image, os.O_RDONLY)
    try:
        _m, views = buffers(2, 4096)
        ops = [read_op(fd, v, 4096 * i, i) for i, v in enumerate(views)]
        for op in ops:
            eng.submit(op)
        wake(eng, 2)
        assert hook.seen == []
        assert sorted(o.owner for o in got.ops) == [0, 1]
        assert all(o.result == 4096 for o in ops)
    finally:
        eng.close()
        os.close(fd)


def test_a_short_read_takes_the_general_path(image: Path) -> None:  # noqa: F811
    """A read that ends past the end of the file completes short: the general path's `_result`
    goes on from where it stopped and fails it (EIO); the hook never sees it."""
    eng, got, hook = ring_engine()
    fd = os.open(image, os.O_RDONLY)
    try:
        _m, views = buffers(1, 8192)
        op = read_op(fd, views[0], image.stat().st_size - 4096, "short")
        eng.submit(op)
        wake(eng, 1)
        for _ in range(2000):  # the continuation (end of file) completes on its own wake-up
            if got.batches:
                break
            if eng.ring.cq_ready():
                eng._on_readable()
            time.sleep(0.001)
        assert hook.seen == []
        assert got.batches == [[op]] and op.result < 0
    finally:
        eng.close()
        os.close(fd)


def test_a_hook_that_resets_its_device_leaves_the_ring_consistent(image: Path) -> None:  # noqa: F811
    """The hook faults its device, whose reset cancels every op: the cancel reaps the ring,
    this CQE included. Nothing is booked twice, the ring's head stays where the cancel put it,
    and the next read goes through as usual."""
    eng, got, hook = ring_engine(cancel=True)
    fd = os.open(image, os.O_RDONLY)
    try:
        _m, views = buffers(2, 4096)
        first = read_op(fd, views[0], 0, "a")
        eng.submit(first)
        wake(eng, 1)
        assert [o for o, *_ in hook.seen] == [first] and got.batches == []
        assert (eng.in_flight, eng._live, eng._tags, eng.ring.cq_ready()) == (0, set(), {}, 0)
        hook.cancel = False
        second = read_op(fd, views[1], 4096, "b")
        eng.submit(second)
        wake(eng, 1)
        assert [o for o, *_ in hook.seen] == [first, second]
        assert bytes(views[1]) == image.read_bytes()[4096:8192]
        assert (eng.in_flight, eng._tags, eng.ring.cq_ready()) == (0, {}, 0)
    finally:
        eng.close()
        os.close(fd)
