"""Property test: any sequence of guest accesses keeps the window inside the spec.

Random register accesses (every offset, every size, values biased towards the meaningful ones),
mixed with whole Linux probes, kicks of real rings, scribbles over guest memory where the rings
live, and device-side events. After every step: nothing raised out of the window, the identity
registers still identify the device, Status holds only status bits and obeys the coupling with
the device's state, the interrupt line matches InterruptStatus, and no byte outside guest RAM
changed.
"""

from __future__ import annotations

from typing import Any

import structlog
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.test_mmio_rig import (
    ECHO_DEVICE_ID,
    ECHO_QUEUES,
    RAM_BASE,
    RAM_SIZE,
    EchoDevice,
    RecordingLine,
    Rig,
    bring_up,
)
from vmmiod.memory import MappedMemory
from vmmiod.mmio import VirtioMmio
from vmmiod.mmio_regs import (
    ACKNOWLEDGE,
    CONFIG,
    DEVICE_ID,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MAGIC_VALUE,
    MAGIC_VALUE_VIRT,
    QUEUE_NOTIFY,
    QUEUE_NUM_MAX,
    REGISTER_NAMES,
    STATUS,
    VERSION,
    WINDOW_SIZE,
)
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.transport import VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1, bit

GUARD = 0x1000
STATUS_BITS = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | DEVICE_NEEDS_RESET | FAILED
RING_AREA = 0x2_0000  # the allocator hands rings out from the start of RAM

offsets = st.one_of(
    st.sampled_from(sorted(REGISTER_NAMES)),
    st.integers(CONFIG, CONFIG + 0x20),
    st.integers(0, WINDOW_SIZE - 1),
)
sizes = st.sampled_from([4, 4, 4, 1, 2, 8, 3])
values = st.one_of(
    st.integers(0, 16),
    st.sampled_from([ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK,
                     ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, FAILED, 0xFF,
                     DEVICE_NEEDS_RESET]),
    st.builds(lambda k: RAM_BASE + 0x10 * k, st.integers(0, 0x2000)),
    st.integers(0, 0xFFFF_FFFF),
    st.integers(0, 2**64 - 1),
)
ops = st.one_of(
    st.tuples(st.just("read"), offsets, sizes),
    st.tuples(st.just("write"), offsets, sizes, values),
    st.tuples(st.just("write"), st.sampled_from(sorted(REGISTER_NAMES)), st.just(4), values),
    st.tuples(st.just("interrupt")),
    st.tuples(st.just("probe"), st.booleans()),
    st.tuples(st.just("kick"), st.integers(0, 2)),
    st.tuples(st.just("scribble"), st.integers(0, RING_AREA - 8),
              st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("device"), st.sampled_from(["config", "used", "fault"])),
)


class Guarded:
    """Guest RAM in the middle of a larger host buffer whose edges must never change."""

    def __init__(self) -> None:
        self.backing = bytearray(b"\x5a" * (RAM_SIZE + 2 * GUARD))
        self.memory = MappedMemory()
        self.memory.add_buffer(RAM_BASE, memoryview(self.backing)[GUARD:GUARD + RAM_SIZE])
        self.memory.write(RAM_BASE, bytes(RAM_SIZE))

    def intact(self) -> bool:
        return self.backing[:GUARD] == b"\x5a" * GUARD and self.backing[-GUARD:] == b"\x5a" * GUARD


def check_invariants(rig: Rig, version: int, guarded: Guarded) -> None:
    w = rig.window
    assert w.read(MAGIC_VALUE, 4) == MAGIC_VALUE_VIRT
    assert w.read(VERSION, 4) == version
    assert w.read(DEVICE_ID, 4) == ECHO_DEVICE_ID
    status = w.read(STATUS, 4)
    assert status & ~STATUS_BITS == 0
    assert w.read(QUEUE_NUM_MAX, 4) in (0, *ECHO_QUEUES)
    isr = w.read(INTERRUPT_STATUS, 4)
    assert isr & ~3 == 0
    assert rig.line.level == bool(isr)
    assert w.features & ~w.offered_features == 0
    if version == 2 and status & FEATURES_OK:
        assert w.features & bit(VIRTIO_F_VERSION_1)
    if version == 1:
        assert not w.offered_features & bit(VIRTIO_F_VERSION_1)
    assert rig.device.active == bool(status & DRIVER_OK)
    if status == 0:
        assert not any(q.ready for q in w.queues)
    for q in w.queues:
        if q.ready:
            assert 1 <= q.size <= q.max_size and not q.size & (q.size - 1)
    assert guarded.intact()


def run_op(rig: Rig, op: tuple[Any, ...], dqs: list[DriverQueue]) -> None:
    kind = op[0]
    if kind == "read":
        _, off, size = op
        value = rig.window.read(off, size)
        assert 0 <= value < 1 << (8 * min(size, 8))
    elif kind == "write":
        _, off, size, value = op
        rig.window.write(off, size, value & ((1 << (8 * min(size, 8))) - 1))
    elif kind == "probe":
        rig.alloc = Allocator(RAM_BASE, RING_AREA)  # reuse the ring area: scribbles hit rings
        try:
            dqs[:] = bring_up(rig, None if op[1] else bit(VIRTIO_F_VERSION_1))
        except (MemoryError, BufferError):
            pass
    elif kind == "kick":
        if op[1] < len(dqs):
            dq = dqs[op[1]]
            try:
                out = rig.buffer(b"data")
                dq.add([out], [rig.buffer(4)])
            except (MemoryError, BufferError):
                return
            rig.window.write(QUEUE_NOTIFY, 4, dq.index)
    elif kind == "interrupt":  # Linux's vm_interrupt: read InterruptStatus, ACK those bits
        isr = rig.window.read(INTERRUPT_STATUS, 4)
        rig.window.write(INTERRUPT_ACK, 4, isr)
    elif kind == "scribble":
        rig.memory.write(RAM_BASE + op[1], op[2])
    elif kind == "device":
        if op[1] == "config":
            rig.window.signal_config_change()
        elif op[1] == "used":
            rig.window.signal_used(0)
        else:
            rig.window.device_fault("property test")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([1, 2]), ring_reset=st.booleans(),
       seq=st.lists(ops, min_size=5, max_size=80))
def test_random_access_sequences_stay_within_spec(version: int, ring_reset: bool,
                                                   seq: list[tuple[Any, ...]]) -> None:
    guarded = Guarded()
    device = EchoDevice(extra_features=bit(VIRTIO_F_RING_RESET) if ring_reset else 0,
                        log=structlog.get_logger())
    line = RecordingLine()
    window = VirtioMmio(device, line, version=version)
    window.attach(guarded.memory)
    rig = Rig(window, device, line, guarded.memory, bytearray(), Allocator(RAM_BASE, RING_AREA))
    dqs: list[DriverQueue] = []
    reached, served = 0, False
    for op in seq:
        run_op(rig, op, dqs)
        check_invariants(rig, version, guarded)
        reached |= window.status
        served |= bool(device.seen)
    event(f"status bits reached: {reached:#04x}")
    event(f"device served a chain: {served}")
    # Whatever happened, a reset and a clean probe bring a working device back.
    rig.alloc = Allocator(RAM_BASE + RING_AREA, RAM_SIZE - RING_AREA)
    window.write(STATUS, 4, 0)
    dqs = bring_up(rig)
    out, in_ = rig.buffer(b"alive"), rig.buffer(5)
    dqs[0].add([out], [in_], token="t")
    dqs[0].kick_prepare()
    window.write(QUEUE_NOTIFY, 4, 0)
    assert dqs[0].get_used() == ("t", 5)
    assert rig.memory.read(in_[0], 5) == b"evila"
    check_invariants(rig, version, guarded)
