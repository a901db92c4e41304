"""The register window driven the way Linux's virtio_mmio.c drives it, v2 and legacy v1.

Each probe test spells out the driver's accesses in order (drivers/virtio/virtio_mmio.c:
vm_probe, virtio_dev_probe, vm_setup_vq, vm_notify, vm_interrupt, vm_reset, vm_del_vqs) and
checks what the guest reads back after every step.
"""

from __future__ import annotations

import structlog.testing

from tests.test_mmio_rig import (
    ECHO_CONFIG,
    ECHO_DEVICE_ID,
    FEATURE_NEEDS_PLAIN,
    FEATURE_PLAIN,
    PAGE,
    bring_up,
    make_rig,
    negotiate,
    roundtrip,
    setup_queue,
)
from vmmiod.mmio_regs import (
    ACKNOWLEDGE,
    CONFIG,
    CONFIG_GENERATION,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DEVICE_ID,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    DRIVER_OK,
    FEATURES_OK,
    GUEST_PAGE_SIZE,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MAGIC_VALUE,
    MAGIC_VALUE_VIRT,
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
    VENDOR_ID,
    VERSION,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
)
from vmmiod.sim.vring import DriverQueue
from vmmiod.transport import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, bit

ALL_OFFERED = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
               | bit(FEATURE_PLAIN) | bit(FEATURE_NEEDS_PLAIN))


def test_linux_probe_sequence_v2_step_by_step() -> None:
    rig = make_rig(2)
    r, w = rig.r, rig.w
    # vm_probe
    assert r(MAGIC_VALUE) == MAGIC_VALUE_VIRT
    assert r(VERSION) == 2
    assert r(DEVICE_ID) == ECHO_DEVICE_ID
    assert r(VENDOR_ID) != 0
    # register_virtio_device: reset, then ACKNOWLEDGE (each status change a read-modify-write)
    w(STATUS, 0)
    assert r(STATUS) == 0
    w(STATUS, r(STATUS) | ACKNOWLEDGE)
    assert r(STATUS) == ACKNOWLEDGE
    # virtio_dev_probe: DRIVER, then vm_get_features (high half first)
    w(STATUS, r(STATUS) | DRIVER)
    assert r(STATUS) == ACKNOWLEDGE | DRIVER
    w(DEVICE_FEATURES_SEL, 1)
    high = r(DEVICE_FEATURES)
    w(DEVICE_FEATURES_SEL, 0)
    low = r(DEVICE_FEATURES)
    assert high << 32 | low == ALL_OFFERED
    # vm_finalize_features, written twice as Linux may (e.g. after a driver's own validate)
    wanted = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(FEATURE_PLAIN)
    for _ in range(2):
        w(DRIVER_FEATURES_SEL, 1)
        w(DRIVER_FEATURES, wanted >> 32)
        w(DRIVER_FEATURES_SEL, 0)
        w(DRIVER_FEATURES, wanted & 0xFFFF_FFFF)
    # virtio_features_ok: set FEATURES_OK and read it back
    w(STATUS, r(STATUS) | FEATURES_OK)
    assert r(STATUS) & FEATURES_OK
    assert rig.window.features == wanted
    # vm_setup_vq for each queue the driver wants
    driver_queues = []
    for index, num_max in enumerate((8, 4)):
        w(QUEUE_SEL, index)
        assert r(QUEUE_READY) == 0  # "already set up" check
        assert r(QUEUE_NUM_MAX) == num_max
        dq = DriverQueue(rig.memory, rig.alloc, num_max, index=index, event_idx=True)
        w(QUEUE_NUM, num_max)
        w(QUEUE_DESC_LOW, dq.desc_addr & 0xFFFF_FFFF)
        w(QUEUE_DESC_HIGH, dq.desc_addr >> 32)
        w(QUEUE_DRIVER_LOW, dq.avail_addr & 0xFFFF_FFFF)
        w(QUEUE_DRIVER_HIGH, dq.avail_addr >> 32)
        w(QUEUE_DEVICE_LOW, dq.used_addr & 0xFFFF_FFFF)
        w(QUEUE_DEVICE_HIGH, dq.used_addr >> 32)
        w(QUEUE_READY, 1)
        assert r(QUEUE_READY) == 1
        q = rig.window.queues[index]
        assert (q.size, q.desc_addr, q.avail_addr, q.used_addr) == (
            num_max, dq.desc_addr, dq.avail_addr, dq.used_addr)
        assert q.event_idx and not q.indirect
        driver_queues.append(dq)
    # A third queue does not exist: QueueNumMax 0 tells the driver so.
    w(QUEUE_SEL, 2)
    assert r(QUEUE_NUM_MAX) == 0
    assert not rig.device.active
    # virtio_device_ready
    w(STATUS, r(STATUS) | DRIVER_OK)
    assert r(STATUS) == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    assert rig.device.active and rig.device.driver_features == wanted
    assert rig.device.queues is rig.window.queues
    # Runtime: virtqueue_kick -> vm_notify writes the queue index; the device answers
    # and interrupts; vm_interrupt reads InterruptStatus and ACKs the same bits.
    dq = driver_queues[1]
    out, in_ = rig.buffer(b"hello, device"), rig.buffer(13)
    dq.add([out], [in_], token="req")
    assert dq.kick_prepare()
    w(QUEUE_NOTIFY, 1)
    assert rig.device.seen == [(1, b"hello, device")]
    assert rig.line.level
    isr = r(INTERRUPT_STATUS)
    assert isr == VIRTIO_MMIO_INT_VRING
    w(INTERRUPT_ACK, isr)
    assert r(INTERRUPT_STATUS) == 0 and not rig.line.level
    assert dq.get_used() == ("req", 13)
    assert rig.memory.read(in_[0], 13) == b"ecived ,olleh"
    # and the other queue works too
    assert roundtrip(rig, driver_queues[0], b"abc") == b"cba"


def test_linux_probe_sequence_v1_step_by_step() -> None:
    rig = make_rig(1)
    r, w = rig.r, rig.w
    # vm_probe: a legacy device gets GuestPageSize once, at probe time
    assert r(MAGIC_VALUE) == MAGIC_VALUE_VIRT
    assert r(VERSION) == 1
    assert r(DEVICE_ID) == ECHO_DEVICE_ID
    r(VENDOR_ID)
    w(GUEST_PAGE_SIZE, PAGE)
    w(STATUS, 0)
    w(STATUS, r(STATUS) | ACKNOWLEDGE)
    w(STATUS, r(STATUS) | DRIVER)
    w(DEVICE_FEATURES_SEL, 1)
    high = r(DEVICE_FEATURES)
    w(DEVICE_FEATURES_SEL, 0)
    low = r(DEVICE_FEATURES)
    offered = high << 32 | low
    assert not offered & bit(VIRTIO_F_VERSION_1)  # a v1 window never offers VERSION_1
    assert offered == ALL_OFFERED & ~bit(VIRTIO_F_VERSION_1)
    wanted = bit(VIRTIO_F_INDIRECT_DESC) | bit(FEATURE_PLAIN)
    w(DRIVER_FEATURES_SEL, 1)
    w(DRIVER_FEATURES, 0)
    w(DRIVER_FEATURES_SEL, 0)
    w(DRIVER_FEATURES, wanted)
    # Legacy: no FEATURES_OK step. vm_setup_vq checks QueuePFN, not QueueReady.
    dqs = []
    for index, num_max in enumerate((8, 4)):
        w(QUEUE_SEL, index)
        assert r(QUEUE_PFN) == 0
        assert r(QUEUE_NUM_MAX) == num_max
        dq = DriverQueue(rig.memory, rig.alloc, num_max, index=index, indirect=True,
                         legacy_align=PAGE)
        w(QUEUE_NUM, num_max)
        w(QUEUE_ALIGN, PAGE)
        w(QUEUE_PFN, dq.desc_addr // PAGE)
        assert r(QUEUE_PFN) == dq.desc_addr // PAGE
        q = rig.window.queues[index]
        assert (q.desc_addr, q.avail_addr, q.used_addr) == (
            dq.desc_addr, dq.avail_addr, dq.used_addr)
        assert q.ready
        dqs.append(dq)
    w(STATUS, r(STATUS) | DRIVER_OK)
    assert r(STATUS) == ACKNOWLEDGE | DRIVER | DRIVER_OK
    assert rig.device.active and rig.device.driver_features == wanted
    assert rig.window.queues[0].indirect and not rig.window.queues[0].event_idx
    # An indirect chain works (INDIRECT_DESC negotiated through the legacy window).
    out1, out2, in_ = rig.buffer(b"leg"), rig.buffer(b"acy"), rig.buffer(6)
    dqs[0].add([out1, out2], [in_], token=1, indirect=True)
    assert dqs[0].kick_prepare()
    w(QUEUE_NOTIFY, 0)
    assert r(INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING
    w(INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
    assert dqs[0].get_used() == (1, 6)
    assert rig.memory.read(in_[0], 6) == b"ycagel"
    # Legacy config access is byte by byte; there is no ConfigGeneration register.
    assert bytes(r(CONFIG + i, 1) for i in range(16)) == ECHO_CONFIG
    assert r(CONFIG_GENERATION) == 0


def test_teardown_and_reprobe_v2() -> None:
    rig = make_rig(2)
    dqs = bring_up(rig)
    assert roundtrip(rig, dqs[0], b"first") == b"tsrif"
    old_used = rig.memory.read(dqs[0].used_addr, 16)
    # Leave an interrupt pending, as a driver being removed may.
    out, in_ = rig.buffer(b"x"), rig.buffer(1)
    dqs[0].add([out], [in_])
    dqs[0].kick_prepare()
    rig.w(QUEUE_NOTIFY, 0)
    assert rig.line.level
    # virtio_dev_remove: vm_reset (Status 0), then vm_del_vqs: QueueReady 0, read back 0
    rig.w(STATUS, 0)
    assert rig.r(STATUS) == 0
    assert not rig.device.active and rig.device.resets >= 1
    assert rig.r(INTERRUPT_STATUS) == 0 and not rig.line.level
    for i in range(2):
        rig.w(QUEUE_SEL, i)
        rig.w(QUEUE_READY, 0)
        assert rig.r(QUEUE_READY) == 0
        assert not rig.window.queues[i].ready
    assert rig.window.features == 0
    # Re-probe with fresh rings and a different feature set: it all works again.
    used_before = rig.memory.read(dqs[0].used_addr, 16)
    dqs2 = bring_up(rig, bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_INDIRECT_DESC))
    assert rig.device.activations == 2
    assert roundtrip(rig, dqs2[1], b"second") == b"dnoces"
    assert roundtrip(rig, dqs2[0], b"third") == b"driht"
    # The old rings were not touched after the reset.
    assert rig.memory.read(dqs[0].used_addr, 16) == used_before
    assert old_used != used_before  # (the last pre-reset notify had completed)


def test_teardown_and_reprobe_v1_keeps_guest_page_size() -> None:
    rig = make_rig(1)
    dqs = bring_up(rig)
    assert roundtrip(rig, dqs[1], b"one") == b"eno"
    rig.w(STATUS, 0)
    for i in range(2):  # vm_del_vq on a legacy device: QueuePFN 0
        rig.w(QUEUE_SEL, i)
        rig.w(QUEUE_PFN, 0)
        assert rig.r(QUEUE_PFN) == 0
    # Linux writes GuestPageSize only in vm_probe: a driver rebind must work without it.
    negotiate(rig)
    dqs2 = [setup_queue(rig, i) for i in range(2)]
    rig.w(STATUS, rig.r(STATUS) | DRIVER_OK)
    assert rig.r(STATUS) & DRIVER_OK and not rig.r(STATUS) & DEVICE_NEEDS_RESET
    assert roundtrip(rig, dqs2[1], b"two") == b"owt"


def test_detach_resets_and_reattach_reprobes() -> None:
    rig = make_rig(2)
    dqs = bring_up(rig)
    roundtrip(rig, dqs[0], b"a")
    rig.window.signal_used(0)
    rig.window.detach()
    assert not rig.device.active and rig.r(STATUS) == 0 and not rig.line.level
    assert rig.window.memory is None
    assert all(not q.ready for q in rig.window.queues)
    rig.window.attach(rig.memory)
    dqs = bring_up(rig)
    assert roundtrip(rig, dqs[0], b"ab") == b"ba"


def test_queue_ready_without_memory_needs_reset() -> None:
    with structlog.testing.capture_logs() as logs:
        rig = make_rig(2, attach=False)
        negotiate(rig)
        setup_queue(rig, 0)
    assert rig.r(STATUS) & DEVICE_NEEDS_RESET
    assert rig.r(INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG
    assert any(e["event"] == "guest_protocol_violation" for e in logs)

