"""Queue generations: a completion popped before a queue reset, device reset or disconnect is
dropped without touching guest memory (docs/architecture.md, "Queue generations").

The virtqueue tests check the mechanism; the block and console tests are the regressions of
issue 15 items 3 and 4, driven through the real register window (QueueReady=0, Status 0) the
way a driver disables a queue while the device still holds one of its chains.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.test_block_harness import block_config
from tests.test_mmio_rig import RAM_BASE, RAM_SIZE, RecordingLine, Rig, bring_up, setup_queue
from tests.vq_helpers import buffer, make_rig
from vmmiod.config import ConsoleConfig, ConsolePortConfig, FileBackend, GuestConfig, MmioConfig
from vmmiod.devices.base import VirtioDevice
from vmmiod.devices.block import BlockDevice
from vmmiod.devices.block_request import REQ_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH
from vmmiod.devices.console import ConsoleDevice
from vmmiod.memory import MappedMemory
from vmmiod.mmio import VirtioMmio
from vmmiod.mmio_regs import DEVICE_NEEDS_RESET, QUEUE_NOTIFY, QUEUE_READY, QUEUE_SEL, STATUS
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.virtqueue import SplitQueue

REAL_FDATASYNC = os.fdatasync
UNWRITTEN = 0xEE
RECLAIMED = 0x77  # what the driver put into a buffer it took back


# -- the mechanism -----------------------------------------------------------------------------
def test_pop_tags_the_chain_and_reset_makes_it_stale() -> None:
    rig = make_rig(8)
    q = rig.queue
    rig.driver.add([buffer(rig, b"abc")], [buffer(rig, 4)], token="a")
    chain = q.pop()
    assert chain is not None and chain.generation == q.generation
    assert q.is_current(chain) and q.is_current(chain.generation)
    before = bytes(rig.backing)
    gen = q.generation
    q.reset()
    assert q.generation != gen and not q.is_current(chain)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = (
        8, rig.driver.desc_addr, rig.driver.avail_addr, rig.driver.used_addr)
    q.activate(rig.memory)
    assert not q.complete(chain, 3)  # dropped: no used element, nothing written
    assert not q.add_used(chain.head, 3, chain.generation)
    assert q.stale_dropped == 2 and q.next_used == 0
    assert bytes(rig.backing) == before and rig.guards_intact()


def test_current_completion_is_written() -> None:
    rig = make_rig(8)
    q = rig.queue
    rig.driver.add([buffer(rig, b"abc")], [], token="a")
    chain = q.pop()
    assert chain is not None
    assert q.complete(chain, 0)
    q.publish_used()
    assert rig.driver.get_used() == ("a", 0)


def test_generations_are_unique_across_queues() -> None:
    a, b = SplitQueue(8, 0), SplitQueue(8, 0)
    assert a.generation != b.generation
    seen = {a.generation, b.generation}
    for _ in range(3):
        a.reset()
        assert a.generation not in seen
        seen.add(a.generation)


# -- a window over a real device ----------------------------------------------------------------
def window_rig(device: VirtioDevice) -> Rig:
    memory = MappedMemory()
    ram = bytearray(RAM_SIZE)
    memory.add_buffer(RAM_BASE, ram)
    window = VirtioMmio(device, RecordingLine())
    window.attach(memory)
    return Rig(window, device, window.irq_line, memory, ram,  # type: ignore[arg-type]
               Allocator(RAM_BASE, RAM_SIZE))


def disable_queue(rig: Rig, index: int) -> None:
    rig.w(QUEUE_SEL, index)
    rig.w(QUEUE_READY, 0)


def kick(rig: Rig, dq: DriverQueue) -> None:
    if dq.kick_prepare():
        rig.w(QUEUE_NOTIFY, dq.index)


class GatedFlush:
    """os.fdatasync replaced: each call waits for its own gate (the engine's thread blocks);
    calls beyond the gates (the final one at close) pass through."""

    def __init__(self, calls: int) -> None:
        self.gates = [threading.Event() for _ in range(calls)]
        self.started = [threading.Event() for _ in range(calls)]
        self.n = 0

    def __call__(self, fd: int) -> None:
        i = self.n
        self.n += 1
        if i >= len(self.gates):
            REAL_FDATASYNC(fd)
            return
        self.started[i].set()
        if not self.gates[i].wait(30):
            raise TimeoutError("gate never opened")


async def until(cond: Any, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def submit_flush(rig: Rig, dq: DriverQueue, token: str) -> int:
    hdr = rig.alloc.alloc(16, 16)
    rig.memory.write(hdr, REQ_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0))
    status = rig.alloc.alloc(1, 1)
    rig.memory.write(status, bytes([UNWRITTEN]))
    dq.add([(hdr, 16)], [(status, 1)], token=token)
    kick(rig, dq)
    return status


@pytest.mark.parametrize("how", ["queue_ready_0", "queue_ready_0_reenable", "status_0"])
def test_block_flush_finishing_after_reset_touches_nothing(tmp_path: Path, how: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15 item 3. A FLUSH is on the worker thread when the driver disables the queue
    (or resets the device); its completion must write no status into the reclaimed buffer and
    no used element, and must not acknowledge a new FLUSH reusing the head before that one's
    own fdatasync ran. Before generations, QueueReady=0 wrote the status and then faulted the
    device (UsedIdNotInFlight), and with the queue re-enabled it completed the new FLUSH."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))

    async def main() -> None:
        # The thread pool engine, whose fdatasync can be held (io_uring's runs in the kernel).
        dev = BlockDevice(block_config(image, io_engine="threads"), GuestConfig("g"))
        await dev.open()
        gate = GatedFlush(2)
        monkeypatch.setattr(os, "fdatasync", gate)
        rig = window_rig(dev)
        try:
            dq = bring_up(rig)[0]
            ev, ind = dq.event_idx, dq.use_indirect
            old_status = submit_flush(rig, dq, "old")
            await until(gate.started[0].is_set, "the first flush on the worker")
            if how == "status_0":
                rig.w(STATUS, 0)
                dq = bring_up(rig)[0]
            else:
                disable_queue(rig, 0)
            rig.memory.write(old_status, bytes([RECLAIMED]))  # the driver reuses its memory
            new_status = None
            if how != "queue_ready_0":
                if how == "queue_ready_0_reenable":
                    dq = setup_queue(rig, 0, event_idx=ev, indirect=ind)
                new_status = submit_flush(rig, dq, "new")
                await until(lambda: dev.counters["requests_flush"] == 2, "the new flush")
            gate.gates[0].set()  # the old fdatasync returns; the new one still waits

            def old_came_back() -> bool:  # dropped, or (before the fix) any of its effects
                return (dev.counters.get("stale_completions", 0) > 0
                        or rig.memory.read(old_status, 1)[0] != RECLAIMED
                        or bool(rig.window.status & DEVICE_NEEDS_RESET)
                        or dq.used_idx() != 0)
            await until(old_came_back, "the old flush's completion")
            if new_status is not None:
                assert dq.used_idx() == 0, "the old FLUSH acknowledged the new one"
                assert rig.memory.read(new_status, 1)[0] == UNWRITTEN
            assert rig.memory.read(old_status, 1)[0] == RECLAIMED
            assert not rig.window.status & DEVICE_NEEDS_RESET
            assert dev.counters.get("violations", 0) == 0
            assert dev.counters["stale_completions"] == 1
            if new_status is not None:
                gate.gates[1].set()
                await until(lambda: dq.used_idx() == 1, "the new flush's completion")
                assert dq.get_used() == ("new", 1)
                assert rig.memory.read(new_status, 1)[0] == VIRTIO_BLK_S_OK
            assert dev.counters["in_flight"] == 0
        finally:
            for g in gate.gates:
                g.set()
            rig.w(STATUS, 0)
            await dev.close()

    asyncio.run(asyncio.wait_for(main(), 60))


class StallingWrite:
    """A console backend's write that takes nothing while `open` is False."""

    def __init__(self) -> None:
        self.open = False
        self.got = bytearray()

    def __call__(self, data: Any) -> int:
        if not self.open:
            return 0
        self.got += bytes(data)
        return len(data)


def test_console_pending_transmit_is_dropped_on_queue_disable(tmp_path: Path) -> None:
    """Issue 15 item 4. A transmit chain held because the backend was full survives a
    single-queue disable; after re-enable its bytes must not be sent nor its head completed
    into the new ring. Before the fix the old bytes went out and the device faulted
    (UsedIdNotInFlight) or completed the new ring's head."""
    port = ConsolePortConfig("p0", FileBackend(path=tmp_path / "out.log"), 4096)
    dev = ConsoleDevice(ConsoleConfig("con0", MmioConfig(0x1000, 5), (port,)), GuestConfig("g"))
    write = StallingWrite()
    dev.ports[0].backend.write = write  # type: ignore[method-assign]
    rig = window_rig(dev)
    dqs = bring_up(rig)
    txq = dqs[1]
    old = rig.buffer(b"OLD")
    txq.add([old], [], token="old")
    kick(rig, txq)  # no event loop: the device runs the queue at once
    assert dev.ports[0].tx_pending is not None
    disable_queue(rig, 1)
    rig.memory.write(old[0], b"xxx")  # the driver reuses the buffer
    txq = setup_queue(rig, 1, event_idx=txq.event_idx, indirect=txq.use_indirect)
    txq.add([rig.buffer(b"NEW")], [], token="new")
    write.open = True
    kick(rig, txq)
    dev.ports[0].backend_writable()
    assert bytes(write.got) == b"NEW"
    assert txq.drain_used() == [("new", 0)]
    assert not rig.window.status & DEVICE_NEEDS_RESET
    assert dev.counters.get("violations", 0) == 0
    rig.w(STATUS, 0)
