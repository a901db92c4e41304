"""A lone io_uring completion handed to the owner's hook first (vmmiod/blockio/lone.py), and
every case that must take the general path instead, against a real ring and a real file."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
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


class Rig:
    """An io_uring engine with a `lone` hook, and the image open for reading."""

    def __init__(self, path: Path) -> None:
        if not uring_available():
            pytest.skip("io_uring is not available on this machine")
        self.got = Collector()
        eng, _ = open_engine("io_uring", self.got)
        assert isinstance(eng, UringEngine)
        eng.nowait = False  # no buffered read answered inline: every read goes through the ring
        self.eng = eng
        self.hook = eng.lone = Hook(eng)
        self.fd = os.open(path, os.O_RDONLY)
        self.mem, self.views = buffers(2, 8192)

    def read(self, buf: int, offset: int, length: int = 4096) -> Op:
        op = Op(READ, self.fd, [self.views[buf][:length]], offset, length, (buf, offset))
        self.eng.submit(op)
        return op

    def close(self) -> None:
        self.eng.close()
        os.close(self.fd)


@pytest.fixture
def rig(image: Path) -> Iterator[Rig]:  # noqa: F811
    r = Rig(image)
    yield r
    r.close()


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


def test_a_lone_completion_goes_to_the_hook_before_the_engine_books_it(
        rig: Rig, image: Path) -> None:  # noqa: F811
    eng = rig.eng
    op = rig.read(0, 8192)
    wake(eng, 1)
    # Answered first: the hook saw the result while the op was still the engine's.
    assert rig.hook.seen == [(op, 4096, True, 1)]
    assert bytes(rig.views[0][:4096]) == image.read_bytes()[8192:8192 + 4096]
    assert rig.got.batches == []  # not delivered a second time
    assert (eng.in_flight, eng._live, eng._tags, eng._owed, eng.ring.cq_ready()) == (
        0, set(), {}, 0, 0)
    assert op.views == [] and op.keep is None


def test_a_declined_lone_completion_is_delivered_as_usual(rig: Rig) -> None:
    rig.hook.answer = False
    op = rig.read(0, 0)
    wake(rig.eng, 1)
    assert [o for o, *_ in rig.hook.seen] == [op]
    assert rig.got.batches == [[op]] and op.result == 4096
    assert (rig.eng.in_flight, rig.eng._tags, rig.eng.ring.cq_ready()) == (0, {}, 0)


def test_two_completions_in_one_wake_up_take_the_general_path(rig: Rig) -> None:
    ops = [rig.read(0, 0), rig.read(1, 4096)]
    wake(rig.eng, 2)
    assert rig.hook.seen == []
    assert sorted(o.owner for o in rig.got.ops) == [(0, 0), (1, 4096)]
    assert all(o.result == 4096 for o in ops)


def test_a_short_read_takes_the_general_path(rig: Rig, image: Path) -> None:  # noqa: F811
    """A read that ends past the end of the file completes short: the general path's `_result`
    goes on from where it stopped and fails it (EIO); the hook never sees it."""
    op = rig.read(0, image.stat().st_size - 4096, 8192)
    wake(rig.eng, 1)
    for _ in range(2000):  # the continuation (end of file) completes on its own wake-up
        if rig.got.batches:
            break
        if rig.eng.ring.cq_ready():
            rig.eng._on_readable()
        time.sleep(0.001)
    assert rig.hook.seen == []
    assert rig.got.batches == [[op]] and op.result < 0


def test_a_hook_that_resets_its_device_leaves_the_ring_consistent(
        rig: Rig, image: Path) -> None:  # noqa: F811
    """The hook faults its device, whose reset cancels every op: the cancel reaps the ring,
    this CQE included. Nothing is booked twice, the ring's head stays where the cancel put it,
    and the next read goes through as usual."""
    eng = rig.eng
    rig.hook.cancel = True
    first = rig.read(0, 0)
    wake(eng, 1)
    assert [o for o, *_ in rig.hook.seen] == [first] and rig.got.batches == []
    assert (eng.in_flight, eng._live, eng._tags, eng.ring.cq_ready()) == (0, set(), {}, 0)
    rig.hook.cancel = False
    second = rig.read(1, 4096)
    wake(eng, 1)
    assert [o for o, *_ in rig.hook.seen] == [first, second]
    assert bytes(rig.views[1][:4096]) == image.read_bytes()[4096:8192]
    assert (eng.in_flight, eng._tags, eng.ring.cq_ready()) == (0, {}, 0)
