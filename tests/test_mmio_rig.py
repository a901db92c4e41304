"""Shared rig for the register-window tests: a small device, an interrupt line, guest memory.

`EchoDevice` is a real VirtioDevice: it pops chains from its queues, writes the readable bytes
back reversed into the writable space, and publishes used buffers through the base class. The
guest side is the project's driver model (vmmiod/sim/vring.py) over a MappedMemory, so every
ring the window enables is a real ring in (test) guest memory.

The few tests at the bottom check the rig itself, so a broken rig cannot make the window's
tests pass for the wrong reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from vmmiod.devices.base import VirtioDevice
from vmmiod.memory import MappedMemory
from vmmiod.mmio import VirtioMmio
from vmmiod.mmio_regs import (
    ACKNOWLEDGE,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DRIVER,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    DRIVER_OK,
    FEATURES_OK,
    GUEST_PAGE_SIZE,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    QUEUE_ALIGN,
    QUEUE_DESC_HIGH,
    QUEUE_DESC_LOW,
    QUEUE_DEVICE_HIGH,
    QUEUE_DEVICE_LOW,
    QUEUE_DRIVER_HIGH,
    QUEUE_DRIVER_LOW,
    QUEUE_NOTIFY,
    QUEUE_NUM,
    QUEUE_NUM_MAX,
    QUEUE_PFN,
    QUEUE_READY,
    QUEUE_SEL,
    STATUS,
)
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.transport import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, bit

RAM_BASE = 0x4000_0000
RAM_SIZE = 0x10_0000
PAGE = 4096
ECHO_DEVICE_ID = 42  # not a registered virtio device type: nothing can mistake it for one
ECHO_QUEUES = (8, 4)
# Config space: u64 capacity at 0, u32 writable "knob" at 8, 4 read-only bytes at 12.
ECHO_CONFIG = bytes(range(0x10, 0x20))
FEATURE_PLAIN = 0  # a device feature with no rules
FEATURE_NEEDS_PLAIN = 1  # the device refuses this one without FEATURE_PLAIN (validate_features)


class EchoDevice(VirtioDevice):
    device_id = ECHO_DEVICE_ID
    type_name = "echo"

    def __init__(self, queue_max_sizes: tuple[int, ...] = ECHO_QUEUES, *,
                 extra_features: int = 0, log: Any = None) -> None:
        super().__init__("echo0", queue_max_sizes, log=log)
        self.extra_features = extra_features
        self.config = bytearray(ECHO_CONFIG)
        self.seen: list[tuple[int, bytes]] = []
        self.activations = 0
        self.resets = 0

    def device_features(self) -> int:
        return (super().device_features() | bit(FEATURE_PLAIN) | bit(FEATURE_NEEDS_PLAIN)
                | self.extra_features)

    def validate_features(self, features: int) -> bool:
        return not (features & bit(FEATURE_NEEDS_PLAIN) and not features & bit(FEATURE_PLAIN))

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, size: int, value: int) -> None:
        if 8 <= offset and offset + size <= 12:  # only the knob is writable
            self.config[offset:offset + size] = value.to_bytes(size, "little")

    def set_capacity(self, value: int) -> None:
        """A device-side config change, announced as the spec asks."""
        self.config[0:8] = value.to_bytes(8, "little")
        if self.transport is not None:
            self.transport.signal_config_change()

    def on_activate(self) -> None:
        self.activations += 1

    def on_reset(self) -> None:
        self.resets += 1

    def process_queue(self, index: int) -> None:
        q = self.queues[index]
        while (chain := q.pop()) is not None:
            data = chain.read()
            self.seen.append((index, data))
            n = chain.write(data[::-1][:chain.writable_len])
            q.add_used(chain.head, n)
        self.notify_used(index)


@dataclass
class RecordingLine:
    """An InterruptLine as a level-triggered adaptor would drive it, with a history."""

    level: bool = False
    events: list[str] = field(default_factory=list)

    def raise_(self) -> None:
        self.level = True
        self.events.append("raise")

    def lower(self) -> None:
        self.level = False
        self.events.append("lower")

    @property
    def raises(self) -> int:
        return self.events.count("raise")


@dataclass
class Rig:
    window: VirtioMmio
    device: EchoDevice
    line: RecordingLine
    memory: MappedMemory
    ram: bytearray
    alloc: Allocator

    # register access as the guest makes it (32-bit unless told otherwise)
    def r(self, off: int, size: int = 4) -> int:
        return self.window.read(off, size)

    def w(self, off: int, value: int, size: int = 4) -> None:
        self.window.write(off, size, value)

    def buffer(self, data: bytes | int) -> tuple[int, int]:
        n = data if isinstance(data, int) else len(data)
        gpa = self.alloc.alloc(n, 8)
        self.memory.write(gpa, bytes(n) if isinstance(data, int) else data)
        return gpa, n


def make_rig(version: int = 2, *, queues: tuple[int, ...] = ECHO_QUEUES,
             extra_features: int = 0, attach: bool = True) -> Rig:
    """Build inside a `structlog.testing.capture_logs()` block to see the window's events."""
    log = structlog.get_logger().bind(device="echo0")
    device = EchoDevice(queues, extra_features=extra_features, log=log)
    line = RecordingLine()
    window = VirtioMmio(device, line, version=version, log=log)
    ram = bytearray(RAM_SIZE)
    memory = MappedMemory()
    memory.add_buffer(RAM_BASE, ram)
    if attach:
        window.attach(memory)
    return Rig(window, device, line, memory, ram, Allocator(RAM_BASE, RAM_SIZE))


# -- the Linux driver's moves, as helpers for tests that are not about the probe itself ------------
def negotiate(rig: Rig, features: int | None = None) -> int:
    """Reset, ACK, DRIVER, features (high half then low, as Linux), FEATURES_OK on v2."""
    rig.w(STATUS, 0)
    rig.w(STATUS, rig.r(STATUS) | ACKNOWLEDGE)
    rig.w(STATUS, rig.r(STATUS) | DRIVER)
    rig.w(DEVICE_FEATURES_SEL, 1)
    offered = rig.r(DEVICE_FEATURES) << 32
    rig.w(DEVICE_FEATURES_SEL, 0)
    offered |= rig.r(DEVICE_FEATURES)
    wanted = offered if features is None else features
    rig.w(DRIVER_FEATURES_SEL, 1)
    rig.w(DRIVER_FEATURES, wanted >> 32)
    rig.w(DRIVER_FEATURES_SEL, 0)
    rig.w(DRIVER_FEATURES, wanted & 0xFFFF_FFFF)
    if rig.window.version == 2:
        rig.w(STATUS, rig.r(STATUS) | FEATURES_OK)
    return wanted


def setup_queue(rig: Rig, index: int, size: int | None = None, *,
                event_idx: bool = False, indirect: bool = False) -> DriverQueue:
    rig.w(QUEUE_SEL, index)
    num_max = rig.r(QUEUE_NUM_MAX)
    n = size or num_max
    legacy = rig.window.version == 1
    dq = DriverQueue(rig.memory, rig.alloc, n, index=index, event_idx=event_idx,
                     indirect=indirect, legacy_align=PAGE if legacy else None)
    rig.w(QUEUE_NUM, n)
    if legacy:
        rig.w(QUEUE_ALIGN, PAGE)
        rig.w(QUEUE_PFN, dq.desc_addr // PAGE)
    else:
        for low, high, addr in ((QUEUE_DESC_LOW, QUEUE_DESC_HIGH, dq.desc_addr),
                                (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, dq.avail_addr),
                                (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, dq.used_addr)):
            rig.w(low, addr & 0xFFFF_FFFF)
            rig.w(high, addr >> 32)
        rig.w(QUEUE_READY, 1)
    return dq


def bring_up(rig: Rig, features: int | None = None) -> list[DriverQueue]:
    """The whole probe: every queue enabled, DRIVER_OK. Returns the driver's queues."""
    if rig.window.version == 1:
        rig.w(GUEST_PAGE_SIZE, PAGE)
    f = negotiate(rig, features)
    ev = bool(f >> VIRTIO_F_EVENT_IDX & 1)
    ind = bool(f >> VIRTIO_F_INDIRECT_DESC & 1)
    dqs = [setup_queue(rig, i, event_idx=ev, indirect=ind)
           for i in range(len(rig.device.queue_max_sizes))]
    rig.w(STATUS, rig.r(STATUS) | DRIVER_OK)
    return dqs


def roundtrip(rig: Rig, dq: DriverQueue, payload: bytes) -> bytes:
    """Add one out+in chain, kick, take the interrupt like vm_interrupt, return what came back."""
    out = rig.buffer(payload)
    in_ = rig.buffer(len(payload))
    dq.add([out], [in_], token="t")
    if dq.kick_prepare():
        rig.w(QUEUE_NOTIFY, dq.index)
    isr = rig.r(INTERRUPT_STATUS)
    rig.w(INTERRUPT_ACK, isr)
    used = dq.get_used()
    assert used is not None, "the device returned nothing"
    assert used == ("t", len(payload))
    return rig.memory.read(in_[0], len(payload))


# -- checks of the rig itself ----------------------------------------------------------------------
def test_echo_device_validate_features_rule() -> None:
    dev = EchoDevice()
    assert dev.validate_features(bit(FEATURE_PLAIN) | bit(FEATURE_NEEDS_PLAIN))
    assert not dev.validate_features(bit(FEATURE_NEEDS_PLAIN))


def test_echo_device_config_knob_is_the_only_writable_part() -> None:
    dev = EchoDevice()
    dev.write_config(8, 4, 0xDEADBEEF)
    dev.write_config(0, 4, 0)
    dev.write_config(12, 1, 0)
    assert dev.read_config(8, 4) == 0xDEADBEEF
    assert dev.config_bytes()[:8] == ECHO_CONFIG[:8]
    assert dev.config_bytes()[12:] == ECHO_CONFIG[12:]
