"""The batch pop and used-ring writer (vmmiod/virtqueue/batch.py) against SplitQueue's rules."""

from __future__ import annotations

import random

import pytest

from tests.vq_helpers import Rig, buffer, make_rig
from vmmiod.virtqueue import errors as E
from vmmiod.virtqueue.fastwalk import linear_reader
from vmmiod.virtqueue.split import VIRTQ_DESC_F_INDIRECT


def _blk(rig: Rig, i: int, read: bool = True) -> None:
    """A request the way Linux's virtio_blk sends it with INDIRECT_DESC: a table of three."""
    hdr, data, status = buffer(rig, bytes([i]) * 16), buffer(rig, 512), buffer(rig, 1)
    if read:
        rig.driver.add([hdr], [data, status], token=i, indirect=True)
    else:
        rig.driver.add([hdr, data], [status], token=i, indirect=True)


def _chains(rig: Rig, popped: list[tuple[int, tuple[int, ...]]]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for head, v in popped:
        reader = linear_reader((v[2], v[6], v[10]))
        assert reader is not None
        c = reader(v, rig.memory, head)
        out.append((c.head, c.readable, c.writable, c.readable_len, c.writable_len))
    return out


def test_pop_tables_returns_what_pop_returns_for_every_mix() -> None:
    """Two queues with the same ring: pop_tables then pop where it stops, against pop alone."""
    rng = random.Random(5)
    for _ in range(20):
        twins = [make_rig(size=64, indirect=True), make_rig(size=64, indirect=True)]
        for k in range(rng.randrange(1, 30)):  # at most 58 of 64 descriptors
            shape = rng.randrange(4)
            for rig in twins:
                if shape == 0:
                    _blk(rig, k)
                elif shape == 1:
                    _blk(rig, k, read=False)
                elif shape == 2:  # a direct chain
                    rig.driver.add([buffer(rig, 16)], [buffer(rig, 1)], token=k, indirect=False)
                else:  # an indirect table of four
                    rig.driver.add([buffer(rig, 16), buffer(rig, 8)], [buffer(rig, 4),
                                   buffer(rig, 1)], token=k, indirect=True)
        for rig in twins:
            rig.driver.kick_prepare()
        want = []
        while (c := twins[0].queue.pop()) is not None:
            want.append((c.head, c.readable, c.writable, c.readable_len, c.writable_len))
        got: list[tuple[object, ...]] = []
        q = twins[1].queue
        while True:
            got += _chains(twins[1], q.pop_tables(64))
            c = q.pop()
            if c is None:
                break
            got.append((c.head, c.readable, c.writable, c.readable_len, c.writable_len))
        assert got == want
        assert q.next_avail == twins[0].queue.next_avail


def test_pop_tables_across_the_avail_ring_and_16_bit_wrap() -> None:
    rig = make_rig(size=8, indirect=True, start_index=65533)
    for i in range(8):
        _blk(rig, i)
    rig.driver.kick_prepare()
    rig.queue.avail_idx()  # (pop() reads it; pop_tables takes what the last read covers)
    popped = rig.queue.pop_tables(8)
    assert [rig.memory.read(v[0], 1)[0] for _, v in popped] == list(range(8))
    assert rig.queue.next_avail == (65533 + 8) & 0xFFFF
    assert rig.queue.pop_tables(8) == []


def test_pop_tables_respects_the_limit() -> None:
    rig = make_rig(size=8, indirect=True)
    for i in range(6):
        _blk(rig, i)
    rig.driver.kick_prepare()
    rig.queue.avail_idx()  # (pop() reads it; pop_tables takes what the last read covers)
    assert len(rig.queue.pop_tables(4)) == 4
    assert len(rig.queue.pop_tables(4)) == 2


def test_hostile_head_in_the_middle_stops_the_batch_and_pop_names_it() -> None:
    rig = make_rig(size=8, indirect=True)
    for i in range(4):
        _blk(rig, i)
    rig.driver.kick_prepare()
    rig.queue.avail_idx()  # (pop() reads it; pop_tables takes what the last read covers)
    rig.driver.raw_avail(2, 200)  # the third entry names no descriptor
    assert len(rig.queue.pop_tables(8)) == 2
    assert rig.queue.pop_tables(8) == []  # nothing taken from the bad entry on
    with pytest.raises(E.HeadOutOfRange):
        rig.queue.pop()


def test_a_head_twice_in_one_batch_is_popped_once() -> None:
    rig = make_rig(size=8, indirect=True)
    for i in range(3):
        _blk(rig, i)
    rig.driver.kick_prepare()
    rig.queue.avail_idx()  # (pop() reads it; pop_tables takes what the last read covers)
    first = rig.driver.avail_idx - 3
    head0 = rig.memory.read_u16(rig.driver.avail_addr + 4 + 2 * (first % 8))
    rig.driver.raw_avail(first + 1, head0)
    assert len(rig.queue.pop_tables(8)) == 1
    with pytest.raises(E.HeadInFlight):
        rig.queue.pop()


@pytest.mark.parametrize("bad", ["outside", "nested", "loop", "length"])
def test_a_bad_table_is_left_to_pop(bad: str) -> None:
    rig = make_rig(size=8, indirect=True)
    for i in range(3):
        _blk(rig, i)
    rig.driver.kick_prepare()
    rig.queue.avail_idx()  # (pop() reads it; pop_tables takes what the last read covers)
    slot = rig.driver.avail_idx - 2
    head = rig.memory.read_u16(rig.driver.avail_addr + 4 + 2 * (slot % 8))
    addr = rig.memory.read_u64(rig.driver.desc_addr + 16 * head)
    if bad == "outside":
        rig.driver.raw_desc(head, 0x10, 48, VIRTQ_DESC_F_INDIRECT, 0)
    elif bad == "nested":  # the table's second descriptor is INDIRECT
        rig.memory.write_u16(addr + 16 + 12, VIRTQ_DESC_F_INDIRECT | 1)
    elif bad == "loop":  # the second descriptor chains back to the first
        rig.memory.write_u16(addr + 16 + 14, 0)
    else:  # a table length that is not 3 descriptors
        rig.driver.raw_desc(head, addr, 40, VIRTQ_DESC_F_INDIRECT, 0)
    assert len(rig.queue.pop_tables(8)) == 1
    with pytest.raises(E.VirtqueueError):
        rig.queue.pop()


def test_pop_tables_needs_indirect_negotiated() -> None:
    rig = make_rig(size=8, indirect=True)
    _blk(rig, 0)
    rig.driver.kick_prepare()
    rig.queue.avail_idx()  # (pop() reads it; pop_tables takes what the last read covers)
    rig.queue.indirect = False
    assert rig.queue.pop_tables(8) == []
    with pytest.raises(E.IndirectNotNegotiated):
        rig.queue.pop()


def test_add_used_run_wraps_the_used_ring_and_its_index() -> None:
    rig = make_rig(size=8, indirect=True, start_index=65534)  # slot 6 of 8: 5 elements wrap
    for i in range(5):
        _blk(rig, i)
    rig.driver.kick_prepare()
    rig.queue.avail_idx()  # (pop() reads it; pop_tables takes what the last read covers)
    popped = rig.queue.pop_tables(8)
    elems: list[int] = []
    for head, _v in popped:
        elems += (head, 100 + head)
    rig.queue.add_used_run(elems)
    assert rig.queue.next_used == (65534 + 5) & 0xFFFF
    rig.queue.publish_used()
    got = rig.driver.drain_used()
    assert got == [(i, 100 + head) for i, (head, _v) in enumerate(popped)]


def test_add_used_run_refuses_a_head_not_in_flight() -> None:
    rig = make_rig(size=8, indirect=True)
    for i in range(2):
        _blk(rig, i)
    rig.driver.kick_prepare()
    rig.queue.avail_idx()  # (pop() reads it; pop_tables takes what the last read covers)
    popped = rig.queue.pop_tables(8)
    used_before = rig.memory.read(rig.driver.used_addr, 6 + 8 * 8)
    with pytest.raises(E.UsedIdNotInFlight):
        rig.queue.add_used_run([popped[0][0], 1, 7, 1])  # 7 was never popped
    assert rig.memory.read(rig.driver.used_addr, 6 + 8 * 8) == used_before
    with pytest.raises(E.UsedIdNotInFlight):
        rig.queue.add_used_run([popped[1][0], 1, popped[1][0], 1])  # twice


def test_every_queue_class_that_hooks_pop_hooks_the_batch_too() -> None:
    """A subclass that records pops or completions (restart record, vhost-user inflight) must
    see the batch ones as well, or a restart would lose the requests popped in a batch."""
    from vmmiod.hypervisors.vhost_user.vring import VhostQueue
    from vmmiod.virtqueue.recorded import RecordedQueue
    from vmmiod.virtqueue.split import SplitQueue

    for cls in (RecordedQueue, VhostQueue):
        assert issubclass(cls, SplitQueue)
        own = vars(cls)
        if "pop" in own:
            assert "pop_tables" in own, cls
        if "add_used" in own:
            assert "add_used_run" in own, cls
