"""Regressions from the real-Xen end-to-end run: large frames waiting for receive buffers,
and chains from before a queue reset never reaching the new ring."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from vmmiod.config import DgramBackend, GuestConfig, MmioConfig, NetConfig, SocketAddress
from vmmiod.devices.net import RX_QUEUE, TX_QUEUE, NetDevice
from vmmiod.memory import memfd_memory
from vmmiod.sim.net_model import NetDriver
from vmmiod.sim.net_testkit import ETH_P_IP, ether
from vmmiod.sim.vring import Allocator, DriverQueue

MEM_SIZE = 32 << 20
GPA = 0x4000_0000
QSIZE = 64
BUF = 1548  # a mergeable receive buffer for a 1500-byte MTU


class Guest:
    def __init__(self, name: str, backend: DgramBackend, mtu: int = 1500) -> None:
        self.memory, self.fd = memfd_memory(MEM_SIZE, GPA)
        self.alloc = Allocator(GPA, MEM_SIZE)
        cfg = NetConfig(id="net0", mmio=MmioConfig(base=0x1000, irq=5), backend=backend,
                        queue_size=QSIZE, mtu=mtu)
        self.device = NetDevice(cfg, GuestConfig(name=name))
        self.driver: NetDriver

    async def start(self, **kw: object) -> None:
        await self.device.open()
        self.new_driver(**kw)

    def new_driver(self, **kw: object) -> None:
        self.driver = NetDriver(self.device, self.memory, self.alloc, queue_size=QSIZE,
                                **kw)  # type: ignore[arg-type]

    def reset_queue(self, index: int) -> None:
        """QueueReady=0 then a fresh ring and QueueReady=1, as the window does it."""
        sq = self.device.queues[index]
        old = self.driver.queues[index]
        sq.reset()
        self.device.on_queue_reset(index)
        dq = DriverQueue(self.memory, self.alloc, old.size, index=index,
                         event_idx=old.event_idx, indirect=old.use_indirect)
        sq.size, sq.desc_addr, sq.avail_addr, sq.used_addr = \
            dq.size, dq.desc_addr, dq.avail_addr, dq.used_addr
        sq.activate(self.memory, event_idx=dq.event_idx, indirect=dq.use_indirect)
        self.driver.queues[index] = dq
        if index == RX_QUEUE:
            self.driver.rxq = dq
            self.driver._rx_free = []
            self.driver._rx_posted = 0
        elif index == TX_QUEUE:
            self.driver.txq = dq

    async def stop(self) -> None:
        self.device.reset()
        await self.device.close()
        os.close(self.fd)


def unix_pair(tmp: Path) -> tuple[DgramBackend, DgramBackend]:
    a, b = tmp / "a.sock", tmp / "b.sock"
    return (DgramBackend(local=SocketAddress("unix", path=a), remote=SocketAddress("unix", path=b)),
            DgramBackend(local=SocketAddress("unix", path=b), remote=SocketAddress("unix", path=a)))


def run(coro_fn) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro_fn(), 60))


def test_large_frame_waits_for_enough_receive_buffers(tmp_path: Path) -> None:
    async def body() -> None:
        ba, bb = unix_pair(tmp_path)
        a, b = Guest("alpha", ba, mtu=60000), Guest("beta", bb, mtu=60000)
        await a.start()
        await b.start(rx_buf_size=BUF)
        try:
            assert b.driver.mrg
            b.driver.post_rx(8)  # 12 KiB posted: too little for the largest frame
            big = ether(b.device.mac, a.device.mac, ETH_P_IP, os.urandom(50000))
            a.driver.send(big)
            await a.driver.flush_tx()
            assert await b.driver.recv(1, timeout=0.3, repost=False) == []
            assert b.device.counters["rx_dropped_too_big"] == 0
            got = await b.driver.recv(1)  # reposts: now the whole ring is posted
            assert [f for _h, f in got] == [big]
            assert got[0][0].num_buffers == -(-(len(big) + 12) // BUF)
            assert b.device.counters["rx_dropped_too_big"] == 0
            assert b.driver.transport.faults == []
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_receive_queue_reset_forgets_held_chains(tmp_path: Path) -> None:
    async def body() -> None:
        ba, bb = unix_pair(tmp_path)
        a, b = Guest("alpha", ba), Guest("beta", bb)
        await a.start()
        await b.start(rx_buf_size=BUF)
        try:
            b.driver.post_rx()
            first = ether(b.device.mac, a.device.mac, ETH_P_IP, b"one" * 100)
            a.driver.send(first)
            assert [f for _h, f in await b.driver.recv(1, repost=False)] == [first]
            assert len(b.device.rx.held) > 0  # the device holds chains of the old ring
            b.reset_queue(RX_QUEUE)
            b.driver.post_rx(3)  # heads 0..2 again, in a new ring
            second = ether(b.device.mac, a.device.mac, ETH_P_IP, b"two" * 100)
            a.driver.send(second)
            got = await b.driver.recv(1, repost=False)  # raises if an old head comes back
            assert [f for _h, f in got] == [second]
            assert b.driver.transport.faults == []
            assert b.device.counters.get("violations", 0) == 0
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_transmit_under_eagain_resets_and_invalidate_returns_only_exposed_heads(
        tmp_path: Path) -> None:
    """A stressed sender: tiny socket buffer (sends hit EAGAIN and chains go back to the ring),
    memory invalidated, the transmit queue reset and the device reset mid-transfer. The driver
    model raises if the device ever returns a head it did not expose."""
    import random

    async def body() -> None:
        rng = random.Random(7)
        ba, bb = unix_pair(tmp_path)
        a, b = Guest("alpha", ba), Guest("beta", bb)
        await a.start(indirect=True)
        await b.start(rx_buf_size=BUF)
        sock = a.device.backend.sock  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        try:
            sent = 0
            events = {"reset_tx": 0, "reset_dev": 0, "invalidate": 0}
            for step in range(400):
                d = a.driver
                d.reclaim_tx()  # raises on a head the driver did not expose
                for _ in range(rng.randrange(1, 12)):
                    if d.txq.num_free < 2:
                        break
                    frame = ether(b.device.mac, a.device.mac, ETH_P_IP,
                                  step.to_bytes(4, "big") * rng.randrange(10, 300))
                    d.send(frame, split_at=rng.choice([None, 12, 20]), kick=rng.random() < 0.7)
                    sent += 1
                r = rng.random()
                if r < 0.05:
                    a.memory.invalidate()
                    events["invalidate"] += 1
                elif r < 0.08:
                    a.reset_queue(TX_QUEUE)
                    events["reset_tx"] += 1
                elif r < 0.10:
                    a.device.reset()
                    a.new_driver(indirect=True)
                    events["reset_dev"] += 1
                if rng.random() < 0.5:
                    b.driver.rx_frames()
                    b.driver.post_rx()
                await asyncio.sleep(0 if rng.random() < 0.7 else 0.001)
                assert a.driver.transport.faults == []
                assert a.device.counters.get("violations", 0) == 0
            for _ in range(50):
                b.driver.rx_frames()
                b.driver.post_rx()
                a.driver.kick(TX_QUEUE)
                a.driver.reclaim_tx()
                if not a.driver.txq.pending():
                    break
                await asyncio.sleep(0.01)
            assert a.driver.txq.pending() == 0
            assert all(events.values()), events
            assert a.device.counters["tx_frames"] > 0
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_avail_slot_changed_after_a_chain_was_given_back_is_reported(tmp_path: Path) -> None:
    """Sends hit EAGAIN, the device gives the chain back (undo_pop); a guest that then rewrites
    that avail slot makes the device pop another head: logged as virtqueue_inconsistency."""
    from structlog.testing import capture_logs

    async def body() -> None:
        ba, bb = unix_pair(tmp_path)
        a, b = Guest("alpha", ba), Guest("beta", bb)
        await a.start()
        await b.start()
        try:
            d = a.driver
            frame = ether(b.device.mac, a.device.mac, ETH_P_IP, bytes(1400))
            for _ in range(200):  # b posts nothing and reads nothing: its socket fills
                if not a.device.tx.waiting:
                    d.send(frame)
                await asyncio.sleep(0)
                if a.device.tx.waiting:
                    break
            assert a.device.tx.waiting and a.device.tx.undone >= 0
            sq = a.device.queues[TX_QUEUE]
            slot = sq.next_avail
            assert sq.next_avail != d.txq.avail_idx  # the given-back chain is still exposed
            spare = d.txq.add([(d.alloc.alloc(64), 64)], [])  # exposed after it, one slot on
            d.txq.raw_avail(slot, spare)  # the guest rewrites the slot the device gave back
            with capture_logs() as logs:
                b.driver.post_rx()
                for _ in range(100):
                    b.driver.rx_frames()
                    b.driver.post_rx()
                    await asyncio.sleep(0.005)
                    if a.device.counters["inconsistencies"]:
                        break
            assert a.device.counters["inconsistencies"] >= 1
            assert any(e["event"] == "virtqueue_inconsistency" and e["log_level"] == "warning"
                       for e in logs)
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_ring_books_balance_check() -> None:
    from vmmiod.devices.net_rx import ring_unbalanced
    from vmmiod.virtqueue import SplitQueue

    q = SplitQueue(8)
    q.next_avail, q.next_used = 3, 1
    assert ring_unbalanced(q, 2) == 0
    assert ring_unbalanced(q, 0) == 2
    q.next_avail, q.next_used = 1, 0xFFFF  # across the 16-bit wrap
    assert ring_unbalanced(q, 2) == 0


def test_rx_held_chain_added_to_a_full_iovec_adds_no_capacity() -> None:
    """Issue 15 item 7: a chain held once the iovec is full can take no bytes, but RxHeld
    counted its whole length, so the device believed it had room for a frame it had not."""
    from tests.vq_helpers import buffer, make_rig
    from vmmiod.devices.net_rx import IOV_MAX, RxHeld
    from vmmiod.virtqueue import DescriptorChain

    rig = make_rig(ram=0x100000)
    held = RxHeld()
    for head in range(IOV_MAX - 1):
        gpa, n = buffer(rig, 64)
        held.add(DescriptorChain(rig.memory, head % 256, [], [(gpa, n)], 0, n))
    assert held.full() and held.cap == 64 * (IOV_MAX - 1)
    gpa, n = buffer(rig, 4096)
    held.add(DescriptorChain(rig.memory, 0, [], [(gpa, n)], 0, n))
    assert len(held) == IOV_MAX and held.cap == 64 * (IOV_MAX - 1)
