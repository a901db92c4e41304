"""The virtqueue's restart record (vmmiod/virtqueue/record.py): a queue killed between any two
of its stores is taken over by a new queue object with nothing lost and nothing returned twice.

A device model pops, completes out of order, gives back and publishes at random; the "process"
dies at a random moment, inside publish too (between the record's stores and the used.idx
store); a new SplitQueue resumes from the record bytes and the same guest memory; the driver
model then checks that every chain it exposed comes back exactly once.
"""

from __future__ import annotations

import random

import pytest

from tests.vq_helpers import Rig, buffer, make_rig
from vmmiod.virtqueue.record import QueueRecord, StaleRecord, area_size
from vmmiod.virtqueue.recorded import RecordedQueue


class Died(Exception):
    pass


class DyingRecord(QueueRecord):
    """Dies in its next publish at `die`: 0 after the record's first store (before the guest's
    used.idx), 1 after used.idx, 2 half-way through clearing, 3 before R_used; None: never."""

    __slots__ = ("die",)

    def __init__(self, buf: memoryview, max_size: int) -> None:
        super().__init__(buf, max_size)
        self.die: int | None = None

    def before_publish(self, next_avail: int, new_used: int) -> None:
        super().before_publish(next_avail, new_used)
        if self.die == 0:
            raise Died

    def after_publish(self, used_idx: int) -> None:
        if self.die is None:
            super().after_publish(used_idx)
            return
        if self.die == 1:
            raise Died
        heads = list(self.unpublished)
        for h in heads[:len(heads) // 2] if self.die == 2 else heads:
            self.entries[h] = 0
        raise Died


def _rig(size: int, event_idx: bool) -> tuple[Rig, DyingRecord, bytearray]:
    rig = make_rig(size, event_idx=event_idx, queue_class=RecordedQueue)
    raw = bytearray(area_size(rig.queue.max_size))
    rec = DyingRecord(memoryview(raw), rig.queue.max_size)
    rig.queue.attach_record(rec)
    return rig, rec, raw


def _fresh_queue(rig: Rig, raw: bytearray, event_idx: bool) -> tuple[RecordedQueue, QueueRecord]:
    """The next daemon: a new queue on the same rings, resumed from the same record bytes."""
    old = rig.queue
    q = RecordedQueue(old.max_size, old.index)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = (old.size, old.desc_addr, old.avail_addr,
                                                      old.used_addr)
    q.activate(rig.memory, event_idx=event_idx)
    rec = QueueRecord(memoryview(raw), q.max_size)
    return q, rec


@pytest.mark.parametrize("seed", range(100))
def test_death_at_any_point_loses_and_repeats_nothing(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([4, 8, 16])
    event_idx = rng.random() < 0.5
    rig, rec, raw = _rig(size, event_idx)
    q, d = rig.queue, rig.driver
    exposed: set[int] = set()
    returned: list[int] = []
    token = 0
    held: list = []  # popped chains the device has not completed
    steps = rng.randrange(5, 120)
    die_in_publish = rng.random() < 0.5
    try:
        for step in range(steps):
            op = rng.random()
            if op < 0.35 and d.num_free:
                token += 1
                d.add([buffer(rig, token.to_bytes(4, "little"))], [buffer(rig, 8)], token)
                exposed.add(token)
            elif op < 0.6:
                chain = q.pop()
                if chain is not None:
                    if rng.random() < 0.1:
                        q.undo_pop(chain)
                    else:
                        held.append(chain)
            elif op < 0.8 and held:
                chain = held.pop(rng.randrange(len(held)))
                chain.write(b"done")
                q.add_used(chain.head, 4)
            else:
                if die_in_publish and rec.unpublished and rng.random() < 0.2:
                    rec.die = rng.randrange(4)
                q.publish_used()
            returned += [t for t, _ in d.drain_used()]
        if die_in_publish:
            if held:
                q.add_used(held.pop().head, 4)
            rec.die = rng.randrange(4)
            q.publish_used()
    except Died:
        pass
    returned += [t for t, _ in d.drain_used()]
    # The next daemon.
    q2, rec2 = _fresh_queue(rig, raw, event_idx)
    done, chains = q2.resume(rec2)
    for head, length in done:
        q2.add_used(head, length)
    for chain in chains:
        q2.add_used(chain.head, 4)
    q2.publish_used()
    # Then the queue carries on: everything still available is served.
    while (chain := q2.pop()) is not None:
        q2.add_used(chain.head, 4)
    q2.publish_used()
    returned += [t for t, _ in d.drain_used()]
    assert len(returned) == len(set(returned)), "a chain came back twice"
    assert set(returned) == exposed, f"lost: {sorted(exposed - set(returned))}"
    assert d.pending() == 0


def test_record_older_than_the_guest_is_refused() -> None:
    rig, _rec, raw = _rig(8, False)
    q, d = rig.queue, rig.driver
    d.add([buffer(rig, b"a")], [], 1)
    q.add_used(q.pop().head, 0)  # type: ignore[union-attr]
    q.publish_used()
    old = bytes(raw)  # a copy of the record at this point
    for t in range(2, 6):
        d.add([buffer(rig, b"b")], [], t)
        q.add_used(q.pop().head, 0)  # type: ignore[union-attr]
        q.publish_used()
    d.drain_used()
    raw[:] = old  # the stale copy comes back
    q2, rec2 = _fresh_queue(rig, raw, False)
    with pytest.raises(StaleRecord, match="older than the guest"):
        q2.resume(rec2)


def test_uninitialised_record_is_refused() -> None:
    rig, _rec, raw = _rig(8, False)
    raw[:] = bytes(len(raw))
    q2, rec2 = _fresh_queue(rig, raw, False)
    with pytest.raises(StaleRecord):
        q2.resume(rec2)


def test_order_of_in_flight_chains_follows_the_avail_ring() -> None:
    rig, _rec, raw = _rig(8, False)
    q, d = rig.queue, rig.driver
    for t in range(5):
        d.add([buffer(rig, bytes([t]))], [], t)
    heads = [q.pop().head for _ in range(5)]  # type: ignore[union-attr]
    q.add_used(heads[1], 0)
    q.publish_used()
    q2, rec2 = _fresh_queue(rig, raw, False)
    done, chains = q2.resume(rec2)
    assert done == []
    assert [c.head for c in chains] == [heads[0], *heads[2:]]
