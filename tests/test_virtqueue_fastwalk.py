"""The indirect fast path of SplitQueue.pop (virtqueue/fastwalk.py) must return exactly what the
full descriptor-by-descriptor walk returns, and raise the same named error, for any table."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.vq_helpers import BASE, make_rig
from vmmiod.virtqueue import VirtqueueError
from vmmiod.virtqueue.split import DESC, VIRTQ_DESC_F_INDIRECT

TABLE = BASE + 0x20000


def outcome(fn):  # type: ignore[no-untyped-def]
    try:
        c = fn()
    except VirtqueueError as exc:
        return ("error", type(exc).__name__)
    return ("chain", c.head, c.readable, c.writable, c.readable_len, c.writable_len)


@st.composite
def tables(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, int, int]], int]:
    k = draw(st.integers(1, 34))
    r = draw(st.integers(0, k))
    descs = []
    for i in range(k):
        flags = (2 if i >= r else 0) | (1 if i < k - 1 else 0)  # the linear shape Linux builds
        nxt = i + 1 if i < k - 1 else 0
        if draw(st.integers(0, 19)) == 0:
            flags = draw(st.integers(0, 7))  # a mutation now and then
        if draw(st.integers(0, 19)) == 0:
            nxt = draw(st.integers(0, k + 2))
        length = draw(st.sampled_from([0, 1, 16, 512, 4096, 2**31, 2**32 - 1]))
        addr = draw(st.sampled_from([BASE + 0x5000, 0, 2**64 - 1]))
        descs.append((addr, length, flags, nxt))
    table_len = draw(st.one_of(st.just(16 * k), st.sampled_from([0, 8, 16 * k + 16])))
    return table_len, descs, draw(st.sampled_from([VIRTQ_DESC_F_INDIRECT, 5, 6]))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=tables())
def test_fast_path_matches_full_walk(t: tuple[int, list[tuple[int, int, int, int]], int]) -> None:
    table_len, descs, head_flags = t
    rig = make_rig(size=8, indirect=True, ram=0x40000)
    for i, d in enumerate(descs):
        buf, off = rig.memory.locate(TABLE + 16 * i, 16, True)
        DESC.pack_into(buf, off, *d)
    rig.driver.raw_desc(0, TABLE, table_len, head_flags, 1)
    rig.driver.raw_desc(1, BASE, 1, 0, 0)
    rig.driver.raw_avail(0, 0)
    rig.driver.raw_avail_idx(1)
    full = outcome(lambda: rig.queue._walk(0))
    fast = outcome(rig.queue.pop)
    assert fast == full
