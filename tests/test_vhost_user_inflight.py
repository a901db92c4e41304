"""The inflight record: requests a back-end popped and never returned are redone, in the order
they were first popped, by the next back-end that gets the record back (SET_INFLIGHT_FD); and
the record's bookkeeping (QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking") is exact,
including a back-end killed between publishing used.idx and clearing the batch."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vhost_user_peer import FrontEnd, ThreadedVhost
from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.hypervisors.vhost_user.inflight import (
    DESC,
    HEAD,
    InflightInvalid,
    InflightRecord,
    queue_stride,
)
from vmmiod.sim.sockets import connect_unix as connect


class HoldingDevice:
    """A device (the neutral VhostDevice protocol) that pops every chain and completes only
    when told: the state a back-end is in when it is killed with requests in flight."""

    device_id = 2
    type_name = "test"

    def __init__(self, name: str = "hold") -> None:
        self.name = name
        self.queue_max_sizes = (64,)
        self.active = False
        self.queues: list[Any] = []
        self.held: list[Any] = []
        self.popped: list[int] = []
        self.complete_at_once = False

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def device_features(self) -> int:
        return 1 << 32

    def validate_features(self, features: int) -> bool:
        return True

    def config_bytes(self) -> bytes:
        return b""

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass

    def activate(self, memory: Any, queues: Any, features: int, transport: Any) -> None:
        self.queues, self.transport, self.active = queues, transport, True

    def reset(self) -> None:
        self.active, self.held = False, []

    def on_queue_reset(self, index: int) -> None:
        self.held = []

    def queue_notify(self, index: int) -> None:
        q = self.queues[index]
        while (chain := q.pop()) is not None:
            self.popped.append(chain.head)
            self.held.append(chain)
        if self.complete_at_once:
            self.complete()

    queue_kicked = queue_notify

    def complete(self) -> None:
        q = self.queues[0]
        for chain in self.held:
            q.add_used(chain.head, 7)
        self.held = []
        if q.publish_used():
            self.transport.signal_used(0)


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[ThreadedVhost, HoldingDevice, str]]:
    dev = HoldingDevice()
    sock = str(tmp_path / "hold.sock")
    with ThreadedVhost([("hold", dev, sock)]) as d:
        yield d, dev, sock


def add(fe: FrontEnd, token: str) -> None:
    buf = fe.alloc.alloc(16)
    fe.rings[0].q.add([], [(buf, 16)], token)


def test_requests_in_flight_at_a_disconnect_are_redone_in_pop_order(
        held: tuple[ThreadedVhost, HoldingDevice, str]) -> None:
    d, dev, sock = held
    fe = FrontEnd(connect(sock))
    fe.negotiate()
    fe.add_mem_reg()
    fe.send(w.GET_INFLIGHT_FD, w.pack_inflight(w.Inflight(0, 0, 1, 64)))
    payload, fds = fe.recv_reply_fds(w.GET_INFLIGHT_FD)
    info = w.Inflight(*w.INFLIGHT.unpack(payload))
    assert (info.num_queues, info.queue_size, info.mmap_size) == (1, 64, queue_stride(64))
    inflight_fd = fds[0]
    fe.ack(w.SET_INFLIGHT_FD, w.pack_inflight(info), (inflight_fd,))
    ring = fe.start_ring(0, size=16)
    d.call(lambda: setattr(dev, "complete_at_once", True))
    for t in ("a", "b"):  # returned normally
        add(fe, t)
    fe.kick(0)
    assert [t for t, _ in fe.wait_used(0, 2)] == ["a", "b"]
    d.call(lambda: setattr(dev, "complete_at_once", False))
    for t in ("c", "d", "e"):  # popped, never returned: the back-end "dies" with them
        add(fe, t)
    fe.kick(0)
    deadline = __import__("time").monotonic() + 5
    while d.call(lambda: len(dev.held)) != 3:
        assert __import__("time").monotonic() < deadline
    first_pops = d.call(lambda: list(dev.popped[2:]))
    fe.sock.close()  # the connection goes; QEMU keeps the ring and the inflight fd
    # QEMU reconnects: same guest memory, same rings, the inflight fd handed back; the base it
    # sends is used.idx (GET_VRING_BASE failed on the dead connection).
    fe.sock = connect(sock)
    fe.negotiate()
    fe.add_mem_reg()
    fe.ack(w.SET_INFLIGHT_FD, w.pack_inflight(info), (inflight_fd,))
    d.call(lambda: setattr(dev, "popped", []))
    d.call(lambda: setattr(dev, "complete_at_once", True))
    fe.start_ring(0, base=ring.q.used_idx(), q=ring.q)
    assert [t for t, _ in fe.wait_used(0, 3)] == ["c", "d", "e"]
    assert d.call(lambda: list(dev.popped)) == first_pops  # redone, in the order first popped
    add(fe, "f")  # and the ring goes on after them
    fe.kick(0)
    assert [t for t, _ in fe.wait_used(0, 1)] == ["f"]
    fe.close()
    __import__("os").close(inflight_fd)


def record(queue_size: int = 8) -> InflightRecord:
    rec, fd, _ = InflightRecord.create(1, queue_size)
    __import__("os").close(fd)
    return rec


def test_record_lifecycle_and_a_kill_between_publish_and_clear() -> None:
    rec = record()
    q = rec.queues[0]
    assert q.start(8, used_idx=5) is None  # fresh: initialised, nothing to redo
    for head in (3, 1, 6):
        q.popped(head)
    q.used(1)
    q.published(6)  # used.idx 5 -> 6: head 1 returned
    assert q.start(8, used_idx=6) == (8, [3, 6])  # 6 + 2 in flight, in pop order
    # Killed after used.idx moved to 8 (heads 3 and 6 returned) but before their marks were
    # cleared: the record's used_idx still says 6, the batch list says 6 -> 3.
    q.used(3)
    q.used(6)
    assert q.start(8, used_idx=8) == (8, [])
    rec.close()


def test_a_record_that_does_not_add_up_is_refused() -> None:
    rec = record()
    q = rec.queues[0]
    q.start(8, used_idx=0)
    struct.pack_into("<B", q.buf, HEAD.size + DESC.size * 7, 1)  # head 7 on a ring of 4
    with pytest.raises(InflightInvalid):
        q.start(4, used_idx=0)
    struct.pack_into("<B", q.buf, HEAD.size + DESC.size * 7, 0)
    struct.pack_into("<H", q.buf, 12, 200)  # last_batch_head out of range, batch pending
    with pytest.raises(InflightInvalid):
        q.start(8, used_idx=3)
    with pytest.raises(InflightInvalid):
        q.start(16, used_idx=0)  # a ring larger than the record
    rec.close()


@pytest.mark.parametrize("how", ["get_vring_base", "reset_owner", "disconnect"])
def test_a_completion_after_the_ring_stopped_is_dropped(
        held: tuple[ThreadedVhost, HoldingDevice, str], how: str) -> None:
    """GET_VRING_BASE, RESET_OWNER and a disconnect give the queue a new generation: a request
    the device completes afterwards (a flush back from the worker thread) writes nothing."""
    d, dev, sock = held
    fe = FrontEnd(connect(sock))
    try:
        fe.negotiate()
        fe.add_mem_reg()
        ring = fe.start_ring(0, size=16)
        add(fe, "late")
        fe.kick(0)
        deadline = time.monotonic() + 5
        while d.call(lambda: len(dev.held)) != 1:
            assert time.monotonic() < deadline
        chain = d.call(lambda: dev.held[0])
        queue = d.call(lambda: dev.queues[0])
        if how == "get_vring_base":
            assert fe.stop_ring(0) == 0  # the held chain is given back (popped again later)
        elif how == "reset_owner":
            fe.ack(w.RESET_OWNER)
        else:
            fe.sock.close()
            while d.call(lambda: d.adaptor.endpoint("hold").sock is not None):  # type: ignore
                assert time.monotonic() < deadline
        used_before = fe.memory.read(ring.q.used_addr, 16)
        assert d.call(lambda: queue.complete(chain, 7)) is False
        assert fe.memory.read(ring.q.used_addr, 16) == used_before
        assert d.call(lambda: queue.stale_dropped) == 1
    finally:
        fe.close()


def test_get_vring_base_gives_back_the_last_chains_popped_and_not_returned(
        held: tuple[ThreadedVhost, HoldingDevice, str]) -> None:
    """A ring stopped and started again (QEMU `stop`/`cont`) without an inflight record loses
    nothing the device held, when what it held are the last chains popped: the base answered
    is before them, and the restarted ring pops them again."""
    d, dev, sock = held
    fe = FrontEnd(connect(sock))
    try:
        fe.negotiate()
        fe.add_mem_reg()
        ring = fe.start_ring(0, size=16)
        d.call(lambda: setattr(dev, "complete_at_once", True))
        add(fe, "done")
        fe.kick(0)
        assert [t for t, _ in fe.wait_used(0, 1)] == ["done"]
        d.call(lambda: setattr(dev, "complete_at_once", False))
        for t in ("held1", "held2"):
            add(fe, t)
        fe.kick(0)
        deadline = time.monotonic() + 5
        while d.call(lambda: len(dev.held)) != 2:
            assert time.monotonic() < deadline
        assert fe.stop_ring(0) == 1  # resume at the first held chain's slot
        d.call(lambda: setattr(dev, "complete_at_once", True))
        fe.rings.pop(0)
        fe.start_ring(0, base=1, q=ring.q)
        assert [t for t, _ in fe.wait_used(0, 2)] == ["held1", "held2"]
        # Out of order: the first of two held chains never returned, the second returned.
        d.call(lambda: setattr(dev, "complete_at_once", False))
        for t in ("stuck", "quick"):
            add(fe, t)
        fe.kick(0)
        while d.call(lambda: len(dev.held)) != 2:
            assert time.monotonic() < deadline
        d.call(lambda: (dev.queues[0].add_used(dev.held[1].head, 7), dev.held.pop()))
        assert fe.stop_ring(0) == 5  # nothing can be given back: "stuck" needs the record
        assert [t for t, _ in ring.q.drain_used()] == ["quick"]  # published at the stop
    finally:
        fe.close()


def test_a_record_smaller_than_the_ring_leaves_the_ring_served_without_one(
        held: tuple[ThreadedVhost, HoldingDevice, str]) -> None:
    """QEMU sizes the inflight record by its own queue-size, the driver may pick a larger ring
    (virtio-mmio offers 1024): the ring is served, only without a record (it raised before)."""
    d, dev, sock = held
    fe = FrontEnd(connect(sock))
    fe.negotiate()
    fe.add_mem_reg()
    fe.send(w.GET_INFLIGHT_FD, w.pack_inflight(w.Inflight(0, 0, 1, 8)))
    payload, fds = fe.recv_reply_fds(w.GET_INFLIGHT_FD)
    info = w.Inflight(*w.INFLIGHT.unpack(payload))
    assert info.queue_size == 8
    fe.ack(w.SET_INFLIGHT_FD, w.pack_inflight(info), (fds[0],))
    fe.start_ring(0, size=16)
    d.call(lambda: setattr(dev, "complete_at_once", True))
    for t in ("a", "b"):
        add(fe, t)
    fe.kick(0)
    assert [t for t, _ in fe.wait_used(0, 2)] == ["a", "b"]
    assert d.call(lambda: dev.queues[0].inflight) is None
    fe.close()
    __import__("os").close(fds[0])


def test_the_per_request_stores_follow_the_layout() -> None:
    """popped/used/published write the fields the split-ring layout names, read back here
    with struct (the record is read by the next back-end, which may be another program)."""
    rec = record()
    q = rec.queues[0]
    assert q.start(8, used_idx=9) is None
    q.popped(5)
    q.popped(2)
    assert DESC.unpack_from(q.buf, HEAD.size + DESC.size * 5) == (1, 0, 1)
    assert DESC.unpack_from(q.buf, HEAD.size + DESC.size * 2) == (1, 0, 2)
    q.used(2)
    q.used(5)
    assert DESC.unpack_from(q.buf, HEAD.size + DESC.size * 5) == (1, 2, 1)  # next: head 2
    assert HEAD.unpack_from(q.buf, 0)[1:] == (1, 8, 5, 9)  # version, desc_num, last, used_idx
    q.published(11)
    assert [DESC.unpack_from(q.buf, HEAD.size + DESC.size * h)[0] for h in (2, 5)] == [0, 0]
    assert HEAD.unpack_from(q.buf, 0)[4] == 11
    rec.close()


@pytest.mark.parametrize("event_idx", [True, False])
def test_a_lone_completion_in_one_call_writes_what_the_four_steps_write(event_idx: bool) -> None:
    """VhostQueue.add_used_publish (the lone completion's one call) against add_used then
    publish_used on a twin queue: the same used ring, the same inflight record bytes, the same
    interrupt decisions and the same bookkeeping, request after request (ring wrap included)."""
    from tests.vq_helpers import make_rig
    from vmmiod.hypervisors.vhost_user.vring import VhostQueue

    rigs = [make_rig(8, event_idx=event_idx, queue_class=VhostQueue) for _ in range(2)]
    recs = [record(), record()]
    for rig, rec in zip(rigs, recs, strict=True):
        q = rig.queue
        assert isinstance(q, VhostQueue)
        q.inflight = rec.queues[0]
        assert q.inflight.start(8, used_idx=0) is None
    wants: list[list[bool]] = [[], []]
    for i in range(20):
        for side, rig in enumerate(rigs):
            q = rig.queue
            assert isinstance(q, VhostQueue)
            rig.driver.add([(0x4000_1000, 16)], [(0x4000_2000, 512 + i)], i)
            chain = q.pop()
            assert chain is not None
            if side == 0:
                q.add_used(chain.head, 513 + i)
                wants[0].append(q.publish_used())
            else:
                wants[1].append(q.add_used_publish(chain.head, 513 + i))
            if i % 3 == 0:  # the driver reaps now and then (EVENT_IDX: its used_event moves)
                rig.driver.drain_used()
        a, b = (r.queue for r in rigs)
        assert isinstance(a, VhostQueue) and isinstance(b, VhostQueue)
        assert rigs[0].backing == rigs[1].backing
        assert bytes(recs[0].queues[0].buf) == bytes(recs[1].queues[0].buf)
        assert (a.next_used, a.outstanding, bytes(a._in_flight)) == (
            b.next_used, b.outstanding, bytes(b._in_flight))
    assert wants[0] == wants[1] and True in wants[0]
    for rec in recs:
        rec.close()
