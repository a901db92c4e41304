"""The guest side (vmmiod/sim/vring.py) and the device side (vmmiod/virtqueue/) of the split ring,
each written from the VIRTIO spec (1.2, section 2.7) on its own, must agree: a mistake one side
makes shows here instead of being shared by the model that is meant to check it."""

from __future__ import annotations

import itertools
import random

import pytest

from tests.vq_helpers import buffer, make_rig
from vmmiod.sim import vring as guest
from vmmiod.virtqueue import split as device

M = 0x10000


def test_descriptor_layout_and_flags_agree() -> None:
    assert guest.VIRTQ_DESC.format == device.DESC.format
    assert guest.VIRTQ_DESC_SIZE == device.DESC_SIZE == device.DESC.size == 16
    assert guest.VIRTQ_DESC_F_NEXT == device.VIRTQ_DESC_F_NEXT == 1
    assert guest.VIRTQ_DESC_F_WRITE == device.VIRTQ_DESC_F_WRITE == 2
    assert guest.VIRTQ_DESC_F_INDIRECT == device.VIRTQ_DESC_F_INDIRECT == 4


def test_ring_flags_and_used_element_agree() -> None:
    assert guest.VIRTQ_AVAIL_F_NO_INTERRUPT == device.VIRTQ_AVAIL_F_NO_INTERRUPT == 1
    assert guest.VIRTQ_USED_F_NO_NOTIFY == device.VIRTQ_USED_F_NO_NOTIFY == 1
    assert guest.VIRTQ_USED_ELEM.format == device.USED_ELEM.format
    assert guest.VIRTQ_USED_ELEM.size == device.USED_ELEM.size == 8


def test_alignment_agrees() -> None:
    assert (guest.DESC_TABLE_ALIGN, guest.AVAIL_RING_ALIGN, guest.USED_RING_ALIGN) == (
        device.DESC_ALIGN, device.AVAIL_ALIGN, device.USED_ALIGN) == (16, 2, 4)


@pytest.mark.parametrize("size", [1, 2, 3, 16, 255, 256, 1024, 4096, 32767, 32768])
def test_ring_sizes_and_event_offsets_agree(size: int) -> None:
    assert guest.avail_ring_bytes(size) == device.avail_ring_size(size)
    assert guest.used_ring_bytes(size) == device.used_ring_size(size)
    # used_event / avail_event are the last u16 of each ring.
    assert guest.used_event_offset(size) == device.avail_ring_size(size) - 2
    assert guest.avail_event_offset(size) == device.used_ring_size(size) - 2


def by_enumeration(event: int, new: int, old: int) -> bool:
    """A third opinion, the spec's words taken literally: notify iff one of the indexes the move
    from `old` to `new` passes over (old, old + 1, ..., new - 1, modulo 2**16) is `event`."""
    steps = (new - old) % M
    return any((old + k) % M == event for k in range(steps))


INTERESTING = sorted({0, 1, 2, 3, 7, 8, 15, 16, 255, 256, 0x7FFE, 0x7FFF, 0x8000, 0x8001,
                      0xFFF0, 0xFFFD, 0xFFFE, 0xFFFF})


def test_need_event_agrees_on_every_interesting_triple() -> None:
    for event, new, old in itertools.product(INTERESTING, repeat=3):
        assert guest.need_event(event, new, old) == device.vring_need_event(event, new, old), (
            event, new, old)


def test_need_event_agrees_on_random_values() -> None:
    rnd = random.Random(18)
    for _ in range(100_000):
        event, new, old = rnd.randrange(M), rnd.randrange(M), rnd.randrange(M)
        assert guest.need_event(event, new, old) == device.vring_need_event(event, new, old), (
            event, new, old)


def test_need_event_matches_the_spec_read_literally() -> None:
    rnd = random.Random(2_7)
    for _ in range(20_000):
        old = rnd.randrange(M)
        new = (old + rnd.randrange(300)) % M  # a move of up to 299 entries, across the wrap too
        event = (old + rnd.randrange(-4, 304)) % M
        expected = by_enumeration(event, new, old)
        assert guest.need_event(event, new, old) == expected, (event, new, old)
        assert device.vring_need_event(event, new, old) == expected, (event, new, old)


@pytest.mark.parametrize("start", [0, 0xFFF8])
def test_the_device_interrupts_when_the_guest_model_says_it_should(start: int) -> None:
    """EVENT_IDX end to end: the guest model writes used_event where it reads it, the device
    decides in publish_used() (its own copy of the formula); both must agree on every batch."""
    rig = make_rig(16, event_idx=True, start_index=start)
    rnd = random.Random(start)
    old = start
    published_once = False
    for _ in range(400):
        batch = rnd.randrange(1, 5)
        for _ in range(batch):
            rig.driver.add([], [buffer(rig, 64)])
        used_event = (old + rnd.randrange(-3, 8)) % M
        rig.memory.write_u16(rig.driver.avail_addr + guest.used_event_offset(16), used_event)
        for _ in range(batch):
            chain = rig.queue.pop()
            assert chain is not None
            rig.queue.add_used(chain.head, 0)
        new = (old + batch) % M
        interrupt = rig.queue.publish_used()
        if published_once:
            assert interrupt == guest.need_event(used_event, new, old), (used_event, new, old)
        published_once = True
        assert rig.driver.used_idx() == new
        rig.driver.drain_used()
        old = new


@pytest.mark.parametrize("start", [0, 0xFFF8])
def test_the_guest_model_kicks_when_the_device_asks(start: int) -> None:
    """The other direction: the device writes avail_event (enable_notification), the guest
    model reads it where its own layout says and decides with its own formula."""
    rig = make_rig(16, event_idx=True, start_index=start)
    rnd = random.Random(start + 1)
    for _ in range(400):
        assert rig.queue.enable_notification() is False  # every entry was consumed
        avail_event = rig.memory.read_u16(rig.driver.used_addr + guest.avail_event_offset(16))
        old = rig.driver.avail_idx
        batch = rnd.randrange(1, 5)
        for _ in range(batch):
            rig.driver.add([buffer(rig, 8)], [])
        kick = rig.driver.kick_prepare()
        assert avail_event == old  # the device wants to hear about the very next entry
        assert kick == device.vring_need_event(avail_event, rig.driver.avail_idx, old) is True
        for _ in range(batch):
            chain = rig.queue.pop()
            assert chain is not None
            rig.queue.add_used(chain.head, 0)
        rig.queue.publish_used()
        rig.driver.drain_used()
