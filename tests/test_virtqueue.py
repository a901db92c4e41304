"""Split virtqueue: normal operation, notifications, and one test per hostile-driver rule."""

from __future__ import annotations

import pytest

from tests.vq_helpers import BASE, buffer, make_rig
from vmmiod.memory import GuestMemoryError, OutOfBoundsError
from vmmiod.virtqueue import SplitQueue
from vmmiod.virtqueue import errors as E
from vmmiod.virtqueue.split import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    vring_need_event,
)


# -- normal operation -------------------------------------------------------------------------------
def test_block_like_chain_round_trip() -> None:
    rig = make_rig()
    hdr, data, status = buffer(rig, b"H" * 16), buffer(rig, 4096), buffer(rig, 1)
    rig.driver.add([hdr], [data, status], token="req")
    chain = rig.queue.pop()
    assert chain is not None
    assert chain.read() == b"H" * 16
    assert (chain.readable_len, chain.writable_len) == (16, 4097)
    assert chain.write(b"D" * 4096 + b"\x00") == 4097
    rig.queue.add_used(chain.head, 4097)
    assert rig.queue.publish_used()
    assert rig.driver.get_used() == ("req", 4097)
    assert rig.memory.read(data[0], 4096) == b"D" * 4096
    assert rig.queue.pop() is None


def test_views_with_offset_and_length_span_descriptors() -> None:
    rig = make_rig()
    a, b = buffer(rig, b"0123456789"), buffer(rig, b"abcdefghij")
    rig.driver.add([a, b], [])
    chain = rig.queue.pop()
    assert chain is not None
    assert b"".join(chain.readable_views(8, 4)) == b"89ab"
    assert chain.read(15) == b"fghij"
    assert chain.read(20) == b""


def test_indirect_chain_round_trip() -> None:
    rig = make_rig(indirect=True)
    bufs = [buffer(rig, bytes([i]) * 100) for i in range(15)]
    out = buffer(rig, 64)
    rig.driver.add(bufs, [out], indirect=True)
    assert rig.driver.num_free == rig.driver.size - 1  # one descriptor in the main table
    chain = rig.queue.pop()
    assert chain is not None
    assert chain.read() == b"".join(bytes([i]) * 100 for i in range(15))
    assert chain.writable_len == 64


def test_batch_reads_avail_idx_once() -> None:
    rig = make_rig()
    for i in range(4):
        rig.driver.add([buffer(rig, b"x")], [], token=i)
    rig.driver.kick_prepare()
    heads = [rig.queue.pop() for _ in range(4)]
    # A stale cached index would stop here; the device must not skip or repeat.
    assert all(c is not None for c in heads)
    assert rig.queue.pop() is None


def test_wrap_around_of_16_bit_indexes() -> None:
    rig = make_rig(size=4, start_index=65533, event_idx=True)
    seen = []
    for i in range(10):
        rig.driver.add([buffer(rig, bytes([i]))], [buffer(rig, 1)], token=i)
        rig.driver.kick_prepare()
        chain = rig.queue.pop()
        assert chain is not None
        seen.append(chain.read())
        chain.write(b"!")
        rig.queue.add_used(chain.head, 1)
        rig.queue.publish_used()
        assert rig.driver.get_used() == (i, 1)
    assert seen == [bytes([i]) for i in range(10)]
    assert rig.queue.next_avail == (65533 + 10) & 0xFFFF


def test_no_interrupt_flag_without_event_idx() -> None:
    rig = make_rig()
    rig.driver.disable_interrupts()
    rig.driver.add([buffer(rig, b"x")], [])
    c = rig.queue.pop()
    assert c is not None
    rig.queue.add_used(c.head, 0)
    assert not rig.queue.publish_used()
    rig.driver.enable_interrupts()
    rig.driver.add([buffer(rig, b"x")], [])
    c = rig.queue.pop()
    assert c is not None
    rig.queue.add_used(c.head, 0)
    assert rig.queue.publish_used()


def test_no_notify_flag_without_event_idx() -> None:
    rig = make_rig()
    rig.queue.disable_notification()
    rig.driver.add([buffer(rig, b"x")], [])
    assert not rig.driver.kick_prepare()
    assert rig.queue.enable_notification()  # a buffer arrived meanwhile: drain again
    rig.driver.add([buffer(rig, b"x")], [])
    assert rig.driver.kick_prepare()


def test_event_idx_interrupts_only_when_used_event_is_crossed() -> None:
    rig = make_rig(event_idx=True)
    for i in range(3):
        rig.driver.add([buffer(rig, b"x")], [], token=i)
    chains = [rig.queue.pop() for _ in range(3)]
    # The driver asked (used_event = 0) to hear about the first used buffer only.
    rig.queue.add_used(chains[0].head, 0)  # type: ignore[union-attr]
    assert rig.queue.publish_used()
    rig.queue.add_used(chains[1].head, 0)  # type: ignore[union-attr]
    assert not rig.queue.publish_used()
    rig.driver.get_used()  # driver consumes one; used_event = 1, already passed by idx 2
    rig.driver.get_used()  # used_event = 2: the next publish (idx 3) crosses it
    rig.queue.add_used(chains[2].head, 0)  # type: ignore[union-attr]
    assert rig.queue.publish_used()
    assert not rig.queue.publish_used()  # nothing new


def test_event_idx_avail_event_suppresses_driver_notifications() -> None:
    rig = make_rig(event_idx=True)
    rig.driver.add([buffer(rig, b"x")], [])
    assert rig.driver.kick_prepare()  # avail_event = 0 initially: first one notifies
    assert rig.queue.pop() is not None
    rig.driver.add([buffer(rig, b"x")], [])
    assert not rig.driver.kick_prepare()  # device has not asked again
    assert rig.queue.enable_notification()  # asks for index 1, sees work pending
    assert rig.queue.pop() is not None
    assert not rig.queue.enable_notification()
    rig.driver.add([buffer(rig, b"x")], [])
    assert rig.driver.kick_prepare()


def test_vring_need_event_formula() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(65535, 0, 65534)  # window crosses the wrap
    assert not vring_need_event(10, 10, 10)


def test_undo_pop_returns_the_chain() -> None:
    rig = make_rig()
    rig.driver.add([buffer(rig, b"x")], [], token=1)
    c = rig.queue.pop()
    assert c is not None
    rig.queue.undo_pop(c)
    again = rig.queue.pop()
    assert again is not None and again.head == c.head


def test_undo_pop_steps_back_with_the_chain_not_the_slot() -> None:
    """Issue 15 item 5. The driver rewrites the avail slot of a chain the device is about to
    give back, naming a head that is still in flight. undo_pop re-read the slot and cleared
    that other head's in-flight mark, so the next pop took it a second time (and the given
    back head stayed marked forever). It must clear the given-back chain's own head."""
    rig = make_rig()
    rig.driver.add([buffer(rig, b"a")], [], token="a")
    rig.driver.add([buffer(rig, b"b")], [], token="b")
    a = rig.queue.pop()
    b = rig.queue.pop()
    assert a is not None and b is not None and a.head != b.head
    rig.driver.raw_avail(1, a.head)  # slot 1 held b; now it names a, still in flight
    rig.queue.undo_pop(b)
    with pytest.raises(E.HeadInFlight):  # a is in flight: popping it again is refused
        rig.queue.pop()
    rig.queue.add_used(a.head, 0)  # a is still in flight, b is not
    with pytest.raises(E.UsedIdNotInFlight):
        rig.queue.add_used(b.head, 0)


def test_undo_pop_of_a_stale_chain_does_nothing() -> None:
    rig = make_rig()
    rig.driver.add([buffer(rig, b"a")], [], token="a")
    a = rig.queue.pop()
    assert a is not None
    q = rig.queue
    q.reset()
    q.size, q.desc_addr, q.avail_addr, q.used_addr = (
        16, rig.driver.desc_addr, rig.driver.avail_addr, rig.driver.used_addr)
    q.activate(rig.memory)
    q.undo_pop(a)
    assert q.next_avail == 0 and q.in_flight() == 0


def test_reset_forgets_everything() -> None:
    rig = make_rig()
    rig.driver.add([buffer(rig, b"x")], [])
    rig.queue.pop()
    rig.queue.reset()
    assert not rig.queue.ready and rig.queue.next_avail == 0 and rig.queue.in_flight() == 0
    with pytest.raises(E.QueueNotReady):
        rig.queue.pop()


# -- configuration rules ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 12, 512, 65536])
def test_invalid_queue_size(size: int) -> None:
    rig = make_rig(activate=False)
    rig.queue.max_size = 256
    rig.queue.size = size
    with pytest.raises(E.InvalidQueueSize):
        rig.queue.activate(rig.memory)


@pytest.mark.parametrize("field,addr", [("desc_addr", 8), ("avail_addr", 1), ("used_addr", 2)])
def test_misaligned_ring(field: str, addr: int) -> None:
    rig = make_rig(activate=False)
    setattr(rig.queue, field, getattr(rig.queue, field) + addr)
    with pytest.raises(E.MisalignedRing):
        rig.queue.activate(rig.memory)


@pytest.mark.parametrize("field", ["desc_addr", "avail_addr", "used_addr"])
def test_ring_outside_memory(field: str) -> None:
    rig = make_rig(activate=False)
    setattr(rig.queue, field, BASE + 0x40000 - 16)  # runs past the end of RAM
    with pytest.raises(E.RingOutsideMemory):
        rig.queue.activate(rig.memory)
    assert not rig.queue.ready


def test_queue_max_size_must_be_power_of_two() -> None:
    with pytest.raises(ValueError):
        SplitQueue(100)


# -- hostile driver rules -----------------------------------------------------------------------------
def test_avail_index_jump() -> None:
    rig = make_rig(size=8)
    rig.driver.raw_avail_idx(9)
    with pytest.raises(E.AvailIndexJump):
        rig.queue.pop()


def test_head_out_of_range() -> None:
    rig = make_rig(size=8)
    rig.driver.raw_avail(0, 8)
    rig.driver.raw_avail_idx(1)
    with pytest.raises(E.HeadOutOfRange):
        rig.queue.pop()


def test_head_in_flight() -> None:
    rig = make_rig(size=8)
    rig.driver.raw_desc(0, BASE, 1, 0, 0)
    rig.driver.raw_avail(0, 0)
    rig.driver.raw_avail(1, 0)
    rig.driver.raw_avail_idx(2)
    assert rig.queue.pop() is not None
    with pytest.raises(E.HeadInFlight):
        rig.queue.pop()


def test_next_out_of_range() -> None:
    rig = make_rig(size=8)
    rig.driver.raw_desc(0, BASE, 1, VIRTQ_DESC_F_NEXT, 8)
    rig.driver.raw_avail(0, 0)
    rig.driver.raw_avail_idx(1)
    with pytest.raises(E.NextOutOfRange):
        rig.queue.pop()


def test_chain_too_long_loop() -> None:
    rig = make_rig(size=8)
    rig.driver.raw_desc(0, BASE, 1, VIRTQ_DESC_F_NEXT, 1)
    rig.driver.raw_desc(1, BASE, 1, VIRTQ_DESC_F_NEXT, 0)
    rig.driver.raw_avail(0, 0)
    rig.driver.raw_avail_idx(1)
    with pytest.raises(E.ChainTooLong):
        rig.queue.pop()


def test_chain_too_long_indirect_loop() -> None:
    rig = make_rig(size=8, indirect=True)
    table = rig.alloc.alloc(32, 16)
    rig.memory.write(table, bytes(32))
    rig.driver._write_desc(0, BASE, 1, VIRTQ_DESC_F_NEXT, 1, table)
    rig.driver._write_desc(1, BASE, 1, VIRTQ_DESC_F_NEXT, 0, table)
    rig.driver.raw_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    rig.driver.raw_avail(0, 0)
    rig.driver.raw_avail_idx(1)
    with pytest.raises(E.ChainTooLong):
        rig.queue.pop()


def _indirect_head(rig, length: int, flags: int = VIRTQ_DESC_F_INDIRECT, table=None):  # type: ignore[no-untyped-def]
    table = table if table is not None else rig.alloc.alloc(max(length, 16), 16)
    rig.driver.raw_desc(0, table, length, flags, 1)
    rig.driver.raw_desc(1, BASE, 1, 0, 0)
    rig.driver.raw_avail(0, 0)
    rig.driver.raw_avail_idx(1)
    return table


def test_indirect_not_negotiated() -> None:
    rig = make_rig(indirect=False)
    _indirect_head(rig, 16)
    with pytest.raises(E.IndirectNotNegotiated):
        rig.queue.pop()


@pytest.mark.parametrize("length", [0, 15, 17, 40])
def test_indirect_bad_length(length: int) -> None:
    rig = make_rig(indirect=True)
    _indirect_head(rig, length)
    with pytest.raises(E.IndirectBadLength):
        rig.queue.pop()


def test_nested_indirect() -> None:
    rig = make_rig(indirect=True)
    table = _indirect_head(rig, 16)
    rig.driver._write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT, 0, table)
    with pytest.raises(E.NestedIndirect):
        rig.queue.pop()


def test_indirect_with_next() -> None:
    rig = make_rig(indirect=True)
    _indirect_head(rig, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT)
    with pytest.raises(E.IndirectWithNext):
        rig.queue.pop()


def test_indirect_table_outside_memory_is_ring_access_error() -> None:
    rig = make_rig(indirect=True)
    _indirect_head(rig, 64, table=BASE + 0x40000 - 32)
    with pytest.raises(E.RingAccessError):
        rig.queue.pop()


def test_chain_length_overflow() -> None:
    rig = make_rig(size=8)
    rig.driver.raw_desc(0, BASE, 0xFFFF_FFFF, VIRTQ_DESC_F_NEXT, 1)
    rig.driver.raw_desc(1, BASE, 1, 0, 0)
    rig.driver.raw_avail(0, 0)
    rig.driver.raw_avail_idx(1)
    with pytest.raises(E.ChainLengthOverflow):
        rig.queue.pop()


def test_readable_after_writable() -> None:
    rig = make_rig(size=8)
    rig.driver.raw_desc(0, BASE, 1, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
    rig.driver.raw_desc(1, BASE, 1, 0, 0)
    rig.driver.raw_avail(0, 0)
    rig.driver.raw_avail_idx(1)
    with pytest.raises(E.ReadableAfterWritable):
        rig.queue.pop()


def test_used_id_not_in_flight() -> None:
    rig = make_rig()
    rig.driver.add([buffer(rig, b"x")], [])
    c = rig.queue.pop()
    assert c is not None
    rig.queue.add_used(c.head, 0)
    with pytest.raises(E.UsedIdNotInFlight):
        rig.queue.add_used(c.head, 0)
    with pytest.raises(E.UsedIdNotInFlight):
        rig.queue.add_used(9999, 0)


def test_buffer_outside_memory_fails_at_access_not_at_pop() -> None:
    rig = make_rig(size=8)
    rig.driver.raw_desc(0, BASE + 0x40000 - 4, 8, VIRTQ_DESC_F_WRITE, 0)
    rig.driver.raw_avail(0, 0)
    rig.driver.raw_avail_idx(1)
    chain = rig.queue.pop()
    assert chain is not None
    with pytest.raises(OutOfBoundsError):
        chain.write(b"12345678")
    assert rig.guards_intact()


def test_guest_remaps_buffer_between_pop_and_use() -> None:
    rig = make_rig(size=8)
    rig.driver.add([(BASE, 16)], [])
    chain = rig.queue.pop()
    assert chain is not None
    chain.readable[0] = (0x10, 16)  # as if the descriptor now pointed elsewhere
    with pytest.raises(GuestMemoryError):
        chain.read()


def test_every_error_is_a_virtqueue_error_with_a_rule() -> None:
    for name in dir(E):
        cls = getattr(E, name)
        if isinstance(cls, type) and issubclass(cls, Exception):
            assert issubclass(cls, E.VirtqueueError)
            assert cls.rule and cls.rule == cls.rule.lower()
