"""Store-buffering litmus test for barrier.mb(), across two processes on shared memory.

The pattern of the data path's two store-then-load places (publish_used: store used.idx, then
read used_event; enable_notification: store avail_event, then read avail.idx), with vmmiod's
own primitives (`store_u16`, `barrier.mb()`, a `struct` load):

    process A: store_u16(X, i); barrier.mb(); a = load(Y)
    process B: store_u16(Y, i); barrier.mb(); b = load(X)

With sequential consistency at least one of them sees the other's store of round i. If both
miss it, each load passed its own earlier store: the reordering x86-64's TSO allows and that
makes a device miss a kick or an interrupt. Run once with barrier.mb() a no-op (what the data
path had before issue 15) and once with the fence vmmiod.fences installs. Each run is bounded
in time; the counts are printed (pytest -s); with the fence there must be none. Without it the
count depends on the machine (it may be zero: CPython leaves a long gap between the store and
the load).

    python -m tests.test_fence_litmus [seconds]   prints the figures
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time

import pytest

from vmmiod import barrier, fences
from vmmiod.memory import store_u16, store_u32

X, Y = 0, 128  # the two shared fields, on different cache lines
DONE = (256, 384)  # u32: the last round each process finished
SEEN = (4096, 4096 + (1 << 20))  # a byte per round: 1 = saw the other's store of that round
ROUNDS_MAX = (1 << 20) - 1
SIZE = 4096 + (2 << 20)
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
SECONDS = 1.5  # per run


def _side(buf: memoryview, me: int, fence: bool, deadline: float, cpu: int | None) -> None:
    """One process's rounds (runs in a forked child)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if fence:
        _method, fns = fences.make_fences()
        barrier.install(*fns)
    else:
        barrier.uninstall()
    mine, theirs = (X, Y) if me == 0 else (Y, X)
    done_mine, done_theirs = DONE[me], DONE[1 - me]
    seen = SEEN[me]
    unpack16, unpack32 = U16.unpack_from, U32.unpack_from
    clock = time.monotonic
    for i in range(1, ROUNDS_MAX + 1):
        # Start round i only when the other finished round i - 1 (both read its fields first).
        spins = 0
        while unpack32(buf, done_theirs)[0] < i - 1:
            spins += 1
            if not spins & 1023:
                if clock() > deadline:
                    return
                if spins > 65536:
                    os.sched_yield()  # the other side is not running: let it
        if clock() > deadline:
            return
        v = i & 0xFFFF
        store_u16(buf, mine, v)
        barrier.mb()
        got: int = unpack16(buf, theirs)[0]
        # The other side may already have stored round i + 1 (it waits only for our DONE).
        buf[seen + i] = 1 if (got - v) & 0xFFFF in (0, 1) else 0
        store_u32(buf, done_mine, i)


def litmus(fence: bool, seconds: float = SECONDS) -> tuple[int, int]:
    """(rounds both sides ran, rounds where neither saw the other's store)."""
    area = mmap.mmap(-1, SIZE, flags=mmap.MAP_SHARED)
    buf = memoryview(area)
    cpus = sorted(os.sched_getaffinity(0))
    deadline = time.monotonic() + seconds
    pids = []
    for me in (0, 1):
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            code = 1
            try:
                _side(buf, me, fence, deadline, cpus[me] if len(cpus) > 1 else None)
                code = 0
            finally:  # never return into pytest from a forked child
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "a litmus process failed"
    rounds = min(U32.unpack_from(buf, DONE[0])[0], U32.unpack_from(buf, DONE[1])[0])
    a = bytes(buf[SEEN[0] + 1:SEEN[0] + 1 + rounds])
    b = bytes(buf[SEEN[1] + 1:SEEN[1] + 1 + rounds])
    reordered = sum(1 for x, y in zip(a, b) if not x and not y)
    buf.release()
    area.close()
    return rounds, reordered


def test_store_buffering_litmus() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: two processes cannot run at once, nothing can be reordered")
    try:
        fences.make_fences()
    except fences.FencesUnavailable as exc:
        pytest.skip(f"no fences on this machine: {exc}")
    rounds0, without = litmus(fence=False)
    rounds1, with_fence = litmus(fence=True)
    print(f"\nstore-buffering litmus, {SECONDS} s each: without the fence {without} "
          f"reorderings in {rounds0} rounds; with barrier.mb() installed {with_fence} in "
          f"{rounds1} rounds")
    assert rounds1 > 0, "the two processes never ran a round together"
    assert with_fence == 0


if __name__ == "__main__":
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    for f in (False, True):
        n, r = litmus(f, secs)
        print(f"{'with' if f else 'without'} fence: {r} reorderings in {n} rounds ({secs} s)")
