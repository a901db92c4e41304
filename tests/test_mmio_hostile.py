"""A guest that does not follow the protocol: every bad move is ignored or resets the device.

Status skipping steps, features never offered, queue registers at the wrong time, QueueSel and
QueueNotify out of range, odd access sizes, reads of write-only registers, broken queue
configurations. Nothing raises out of the window; each case checks what the guest reads back.
"""

from __future__ import annotations

from typing import Any

import pytest
import structlog.testing

from tests.test_mmio_rig import (
    ECHO_CONFIG,
    FEATURE_NEEDS_PLAIN,
    FEATURE_PLAIN,
    PAGE,
    RAM_BASE,
    RAM_SIZE,
    Rig,
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
    FAILED,
    FEATURES_OK,
    GUEST_PAGE_SIZE,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MAGIC_VALUE,
    MAGIC_VALUE_VIRT,
    QUEUE_ALIGN,
    QUEUE_DESC_LOW,
    QUEUE_DEVICE_LOW,
    QUEUE_DRIVER_LOW,
    QUEUE_NOTIFY,
    QUEUE_NUM,
    QUEUE_NUM_MAX,
    QUEUE_PFN,
    QUEUE_READY,
    QUEUE_RESET,
    QUEUE_SEL,
    SHM_BASE_HIGH,
    SHM_BASE_LOW,
    SHM_LEN_HIGH,
    SHM_LEN_LOW,
    SHM_SEL,
    STATUS,
    VERSION,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
)
from vmmiod.transport import VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1, bit

V1 = bit(VIRTIO_F_VERSION_1)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


# -- status machine --------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("start, attempt", [
    (0, DRIVER),  # DRIVER before ACKNOWLEDGE
    (0, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),  # everything at once
    (ACKNOWLEDGE, ACKNOWLEDGE | DRIVER | FEATURES_OK),  # skips DRIVER
    (ACKNOWLEDGE, ACKNOWLEDGE | DRIVER_OK),
    (ACKNOWLEDGE | DRIVER, DRIVER),  # drops ACKNOWLEDGE
])
def test_status_skipping_steps_is_refused(version: int, start: int, attempt: int) -> None:
    with structlog.testing.capture_logs() as logs:
        rig = make_rig(version)
        for b in (ACKNOWLEDGE, DRIVER):
            if start & b:
                rig.w(STATUS, rig.r(STATUS) | b)
        rig.w(STATUS, attempt)
    assert rig.r(STATUS) == start
    assert not rig.device.active
    assert events(logs, "mmio_access_ignored")[-1]["reason"] == "status_transition"


def test_driver_ok_without_features_ok_refused_on_v2_allowed_on_v1() -> None:
    rig2, rig1 = make_rig(2), make_rig(1)
    for rig in (rig2, rig1):
        rig.w(STATUS, ACKNOWLEDGE)
        rig.w(STATUS, ACKNOWLEDGE | DRIVER)
        rig.w(STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK)
    assert rig2.r(STATUS) == ACKNOWLEDGE | DRIVER and not rig2.device.active
    assert rig1.r(STATUS) == ACKNOWLEDGE | DRIVER | DRIVER_OK and rig1.device.active


def test_failed_is_always_accepted_and_then_only_reset_moves_on() -> None:
    rig = make_rig(2)
    rig.w(STATUS, ACKNOWLEDGE)
    rig.w(STATUS, ACKNOWLEDGE | FAILED)
    assert rig.r(STATUS) == ACKNOWLEDGE | FAILED
    rig.w(STATUS, ACKNOWLEDGE | FAILED | DRIVER)
    assert rig.r(STATUS) == ACKNOWLEDGE | FAILED
    rig.w(STATUS, 0)
    assert rig.r(STATUS) == 0
    assert bring_up(rig) and rig.device.active


def test_status_upper_bits_are_not_status() -> None:
    rig = make_rig(2)
    rig.w(STATUS, 0xFFFF_FF00 | ACKNOWLEDGE)
    assert rig.r(STATUS) == ACKNOWLEDGE


# -- features --------------------------------------------------------------------------------------
def test_features_never_offered_are_masked() -> None:
    with structlog.testing.capture_logs() as logs:
        rig = make_rig(2)
        negotiate(rig, V1 | bit(FEATURE_PLAIN) | bit(7) | bit(50))
    assert rig.r(STATUS) & FEATURES_OK
    assert rig.window.features == V1 | bit(FEATURE_PLAIN)
    assert {e["reason"] for e in events(logs, "mmio_access_ignored")} == {"features_not_offered"}


def test_features_are_replaced_per_half_not_ored() -> None:
    rig = make_rig(2)
    rig.w(STATUS, ACKNOWLEDGE)
    rig.w(STATUS, ACKNOWLEDGE | DRIVER)
    rig.w(DRIVER_FEATURES_SEL, 0)
    rig.w(DRIVER_FEATURES, bit(FEATURE_PLAIN) | bit(FEATURE_NEEDS_PLAIN))
    rig.w(DRIVER_FEATURES, bit(FEATURE_PLAIN))
    rig.w(DRIVER_FEATURES_SEL, 1)
    rig.w(DRIVER_FEATURES, 1)  # VERSION_1
    rig.w(DRIVER_FEATURES_SEL, 5)  # no such half: ignored
    rig.w(DRIVER_FEATURES, 0xFFFF_FFFF)
    rig.w(STATUS, rig.r(STATUS) | FEATURES_OK)
    assert rig.window.features == V1 | bit(FEATURE_PLAIN)
    # Committed: later feature writes change nothing.
    rig.w(DRIVER_FEATURES_SEL, 0)
    rig.w(DRIVER_FEATURES, 0)
    assert rig.window.driver_features == rig.window.features == V1 | bit(FEATURE_PLAIN)


def test_feature_writes_before_driver_are_ignored() -> None:
    rig = make_rig(2)
    rig.w(STATUS, ACKNOWLEDGE)
    rig.w(DRIVER_FEATURES, bit(FEATURE_PLAIN))
    rig.w(STATUS, ACKNOWLEDGE | DRIVER)
    rig.w(DRIVER_FEATURES_SEL, 1)
    rig.w(DRIVER_FEATURES, 1)
    rig.w(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    assert rig.window.features == V1


def test_features_ok_refused_without_version_1_reads_back_clear() -> None:
    with structlog.testing.capture_logs() as logs:
        rig = make_rig(2)
        negotiate(rig, bit(FEATURE_PLAIN))
    assert rig.r(STATUS) == ACKNOWLEDGE | DRIVER
    assert events(logs, "features_rejected")
    # Linux then sets FAILED; a later DRIVER_OK changes nothing.
    rig.w(STATUS, rig.r(STATUS) | FAILED)
    rig.w(STATUS, rig.r(STATUS) | DRIVER_OK)
    assert rig.r(STATUS) == ACKNOWLEDGE | DRIVER | FAILED and not rig.device.active


def test_device_veto_refuses_features_ok() -> None:
    rig = make_rig(2)
    negotiate(rig, V1 | bit(FEATURE_NEEDS_PLAIN))
    assert not rig.r(STATUS) & FEATURES_OK
    negotiate(rig, V1 | bit(FEATURE_NEEDS_PLAIN) | bit(FEATURE_PLAIN))
    assert rig.r(STATUS) & FEATURES_OK


def test_legacy_device_veto_at_driver_ok_needs_reset() -> None:
    rig = make_rig(1)
    rig.w(GUEST_PAGE_SIZE, PAGE)
    negotiate(rig, bit(FEATURE_NEEDS_PLAIN))
    setup_queue(rig, 0)
    rig.w(STATUS, rig.r(STATUS) | DRIVER_OK)
    assert not rig.r(STATUS) & DRIVER_OK
    assert rig.r(STATUS) & DEVICE_NEEDS_RESET and not rig.device.active
    assert rig.r(INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG and rig.line.level


def test_legacy_window_masks_version_1_even_if_written() -> None:
    rig = make_rig(1)
    rig.w(GUEST_PAGE_SIZE, PAGE)
    negotiate(rig, V1 | bit(FEATURE_PLAIN))
    rig.w(STATUS, rig.r(STATUS) | DRIVER_OK)
    assert rig.device.driver_features == bit(FEATURE_PLAIN)


# -- queue registers at the wrong time -------------------------------------------------------------
def test_queue_registers_before_features_ok_are_ignored() -> None:
    with structlog.testing.capture_logs() as logs:
        rig = make_rig(2)
        rig.w(STATUS, ACKNOWLEDGE)
        rig.w(STATUS, ACKNOWLEDGE | DRIVER)
        rig.w(QUEUE_SEL, 0)
        rig.w(QUEUE_NUM, 2)
        rig.w(QUEUE_DESC_LOW, RAM_BASE)
        rig.w(QUEUE_READY, 1)
    q = rig.window.queues[0]
    assert (q.size, q.desc_addr, q.ready) == (8, 0, False)
    assert rig.r(QUEUE_READY) == 0
    assert {e["reason"] for e in events(logs, "mmio_access_ignored")} == {
        "queue_write_before_setup"}


def test_queue_registers_while_ready_are_ignored() -> None:
    rig = make_rig(2)
    dqs = bring_up(rig)
    rig.w(QUEUE_SEL, 0)
    rig.w(QUEUE_DESC_LOW, (RAM_BASE + RAM_SIZE - 0x1000) & 0xFFFF_FFFF)
    rig.w(QUEUE_NUM, 2)
    q = rig.window.queues[0]
    assert (q.size, q.desc_addr) == (8, dqs[0].desc_addr)
    assert roundtrip(rig, dqs[0], b"still fine") == b"enif llits"


def test_queue_sel_out_of_range() -> None:
    rig = make_rig(2)
    negotiate(rig)
    for sel in (2, 0xFFFF, 0xFFFF_FFFF):
        rig.w(QUEUE_SEL, sel)
        assert rig.r(QUEUE_NUM_MAX) == 0
        rig.w(QUEUE_NUM, 4)
        rig.w(QUEUE_DESC_LOW, RAM_BASE)
        rig.w(QUEUE_READY, 1)
        assert rig.r(QUEUE_READY) == 0
        rig.w(QUEUE_RESET, 1)
    assert not rig.r(STATUS) & DEVICE_NEEDS_RESET
    assert all(q.desc_addr == 0 and not q.ready for q in rig.window.queues)


def test_queue_notify_out_of_range_or_not_ready_reaches_no_queue() -> None:
    rig = make_rig(2)
    negotiate(rig)
    dq0 = setup_queue(rig, 0)  # queue 1 stays disabled
    rig.w(STATUS, rig.r(STATUS) | DRIVER_OK)
    before = rig.device.counters["notifications"]
    for value in (1, 2, 7, 0xFFFF_FFFF):
        rig.w(QUEUE_NOTIFY, value)
    assert rig.device.counters["notifications"] == before
    assert not rig.r(STATUS) & DEVICE_NEEDS_RESET
    assert roundtrip(rig, dq0, b"ok") == b"ko"


def test_notify_before_driver_ok_does_not_process() -> None:
    rig = make_rig(2)
    negotiate(rig)
    dq = setup_queue(rig, 0)
    out, in_ = rig.buffer(b"early"), rig.buffer(5)
    dq.add([out], [in_])
    dq.kick_prepare()
    rig.w(QUEUE_NOTIFY, 0)
    assert rig.device.seen == [] and rig.r(INTERRUPT_STATUS) == 0


@pytest.mark.parametrize("num, desc_off, why", [
    (3, 0, "invalid_queue_size"),  # not a power of two
    (16, 0, "invalid_queue_size"),  # above QueueNumMax
    (0, 0, "invalid_queue_size"),
    (8, 8, "misaligned_ring"),
    (8, RAM_SIZE - 64, "ring_outside_memory"),  # runs off the end of guest RAM
])
def test_bad_queue_configuration_needs_reset(num: int, desc_off: int, why: str) -> None:
    with structlog.testing.capture_logs() as logs:
        rig = make_rig(2)
        negotiate(rig)
        rig.w(QUEUE_SEL, 0)
        rig.w(QUEUE_NUM, num)
        base = RAM_BASE + desc_off
        for off, addr in ((QUEUE_DESC_LOW, base), (0x090, base + 0x400), (0x0A0, base + 0x800)):
            rig.w(off, addr)
        rig.w(QUEUE_READY, 1)
    assert rig.r(QUEUE_READY) == 0
    assert rig.r(STATUS) & DEVICE_NEEDS_RESET
    assert rig.r(INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG and rig.line.level
    violations = events(logs, "guest_protocol_violation")
    assert violations and violations[0]["rule"] == why
    # DRIVER_OK is refused after the fault; a reset recovers.
    rig.w(STATUS, rig.r(STATUS) | DRIVER_OK)
    assert not rig.r(STATUS) & DRIVER_OK and not rig.device.active
    rig.w(STATUS, 0)
    assert not rig.line.level
    assert roundtrip(rig, bring_up(rig)[0], b"back") == b"kcab"


@pytest.mark.parametrize("page, align", [(0, PAGE), (3000, PAGE), (PAGE, 0), (PAGE, 100)])
def test_legacy_bad_page_size_or_align_needs_reset(page: int, align: int) -> None:
    rig = make_rig(1)
    rig.w(GUEST_PAGE_SIZE, page)
    negotiate(rig)
    rig.w(QUEUE_SEL, 0)
    rig.w(QUEUE_NUM, 8)
    rig.w(QUEUE_ALIGN, align)
    rig.w(QUEUE_PFN, RAM_BASE // PAGE)
    assert rig.r(QUEUE_PFN) == 0
    assert rig.r(STATUS) & DEVICE_NEEDS_RESET


def test_device_fault_from_hostile_ring_needs_reset_then_recovers() -> None:
    with structlog.testing.capture_logs() as logs:
        rig = make_rig(2)
        dqs = bring_up(rig)
        dqs[0].raw_avail(0, 200)  # head index far beyond the queue size
        dqs[0].raw_avail_idx(1)
        rig.w(QUEUE_NOTIFY, 0)
    status = rig.r(STATUS)
    assert status & DEVICE_NEEDS_RESET and status & DRIVER_OK
    assert rig.r(INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG
    violation = events(logs, "guest_protocol_violation")[0]
    assert violation["error"] == "HeadOutOfRange"
    # The reason names its queue once (issue 15 item 7: it read "queue 0: queue 0: head ...").
    assert violation["reason"].startswith("queue 0: head 200") and \
        violation["reason"].count("queue 0:") == 1
    needs_reset = events(logs, "device_needs_reset")[0]
    assert needs_reset["reason"].count("queue 0:") == 1
    # Linux's read-modify-write of Status carries the device's bit back: still no change.
    rig.w(STATUS, status)
    assert rig.r(STATUS) == status
    rig.w(STATUS, 0)
    assert rig.r(STATUS) == 0
    assert roundtrip(rig, bring_up(rig)[0], b"again") == b"niaga"


# -- access sizes, write-only and read-only registers, unknown offsets -----------------------------
@pytest.mark.parametrize("size", [1, 2, 8, 3])
def test_non_32_bit_register_accesses_are_ignored(size: int) -> None:
    rig = make_rig(2)
    assert rig.r(MAGIC_VALUE, size) == 0
    assert rig.r(VERSION, size) == 0
    rig.w(STATUS, ACKNOWLEDGE, size)
    assert rig.r(STATUS) == 0
    assert rig.window.ignored["access_size"] == 3


@pytest.mark.parametrize("offset", [DEVICE_FEATURES_SEL, DRIVER_FEATURES, DRIVER_FEATURES_SEL,
                                    QUEUE_SEL, QUEUE_NUM, QUEUE_NOTIFY, INTERRUPT_ACK,
                                    QUEUE_DESC_LOW, SHM_SEL])
def test_reads_of_write_only_registers_return_zero(offset: int) -> None:
    rig = make_rig(2)
    bring_up(rig)
    rig.w(QUEUE_SEL, 1)
    rig.w(DEVICE_FEATURES_SEL, 1)
    assert rig.r(offset) == 0
    assert rig.window.ignored["write_only"] == 1


@pytest.mark.parametrize("offset", [MAGIC_VALUE, VERSION, DEVICE_ID, DEVICE_FEATURES,
                                    QUEUE_NUM_MAX, INTERRUPT_STATUS, CONFIG_GENERATION])
def test_writes_to_read_only_registers_are_ignored(offset: int) -> None:
    rig = make_rig(2)
    before = [rig.r(o) for o in (MAGIC_VALUE, VERSION, DEVICE_ID, QUEUE_NUM_MAX, STATUS)]
    rig.w(offset, 0x1234_5678)
    assert [rig.r(o) for o in (MAGIC_VALUE, VERSION, DEVICE_ID, QUEUE_NUM_MAX, STATUS)] == before
    assert rig.window.ignored["read_only"] == 1


def test_unknown_offsets_and_legacy_only_registers() -> None:
    rig2, rig1 = make_rig(2), make_rig(1)
    for off in (0x018, 0x0C4, 0x0F8):
        assert rig2.r(off) == 0 and rig1.r(off) == 0
        rig2.w(off, 1)
    assert rig2.r(QUEUE_PFN) == 0 and rig2.r(GUEST_PAGE_SIZE) == 0  # legacy-only on v2
    assert rig1.r(QUEUE_READY) == 0 and rig1.r(SHM_LEN_LOW) == 0  # modern-only on v1
    assert rig2.window.ignored["unknown_register"] == 8  # 3 reads, 3 writes, 2 legacy reads


def test_shm_registers_report_no_region() -> None:
    rig = make_rig(2)
    for sel in (0, 1, 255):
        rig.w(SHM_SEL, sel)
        assert [rig.r(o) for o in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH)] == [
            0xFFFF_FFFF] * 4


def test_ignored_accesses_are_logged_rate_limited() -> None:
    with structlog.testing.capture_logs() as logs:
        rig = make_rig(2)
        for _ in range(1000):
            rig.r(QUEUE_NOTIFY)
    logged = events(logs, "mmio_access_ignored")
    assert rig.window.ignored["write_only"] == 1000
    assert 1 <= len(logged) <= 11  # 1, 2, 4, ..., 512
    assert logged[-1]["count"] == 512


# -- config space ----------------------------------------------------------------------------------
def test_config_space_sizes_and_writes() -> None:
    rig = make_rig(2)
    cfg = int.from_bytes(ECHO_CONFIG, "little")
    for size in (1, 2, 4, 8):
        for off in range(16 - size + 1):
            expect = cfg >> (8 * off) & ((1 << (8 * size)) - 1)
            assert rig.r(CONFIG + off, size) == expect
    assert rig.r(CONFIG + 1, 3) == 0  # not an access size
    assert rig.r(CONFIG + 0x80, 4) == 0  # beyond the device's config
    rig.w(CONFIG + 8, 0xCAFE, 2)
    assert rig.r(CONFIG + 8, 4) == int.from_bytes(b"\xfe\xca" + ECHO_CONFIG[10:12], "little")
    rig.w(CONFIG + 0, 0, 4)  # read-only part of the device's config
    assert rig.r(CONFIG, 4) == int.from_bytes(ECHO_CONFIG[:4], "little")


def read_u64_like_linux(rig: Rig, off: int) -> int:
    """virtio_cread64 via vm_get: two 32-bit halves inside a ConfigGeneration retry loop."""
    for _ in range(8):
        gen = rig.r(CONFIG_GENERATION)
        value = rig.r(CONFIG + off) | rig.r(CONFIG + off + 4) << 32
        if rig.r(CONFIG_GENERATION) == gen:
            return value
    raise AssertionError("ConfigGeneration never settled")


def test_config_generation_and_config_interrupt() -> None:
    rig = make_rig(2)
    gen0 = rig.r(CONFIG_GENERATION)
    rig.device.transport = rig.window  # before DRIVER_OK: generation moves, no interrupt
    rig.device.set_capacity(1)
    assert rig.r(CONFIG_GENERATION) == gen0 + 1
    assert rig.r(INTERRUPT_STATUS) == 0 and not rig.line.events
    bring_up(rig)
    rig.device.set_capacity(0x1_0000_0002)
    assert rig.r(CONFIG_GENERATION) == gen0 + 2
    assert rig.r(INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG and rig.line.level
    assert read_u64_like_linux(rig, 0) == 0x1_0000_0002


# -- interrupts and queue reset --------------------------------------------------------------------
def test_interrupt_status_ack_and_line() -> None:
    rig = make_rig(2)
    bring_up(rig)
    rig.window.signal_used(0)
    rig.window.signal_config_change()
    assert rig.r(INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    assert rig.line.events == ["raise", "raise"]
    rig.w(INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
    assert rig.r(INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG and rig.line.level
    rig.w(INTERRUPT_ACK, 0xFFFF_FFFC)  # bits that are not set: nothing happens
    assert rig.line.level
    rig.w(INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG)
    assert rig.r(INTERRUPT_STATUS) == 0 and rig.line.events[-1] == "lower"
    rig.w(INTERRUPT_ACK, 3)  # ACK of nothing does not lower again
    assert rig.line.events.count("lower") == 1


def test_queue_reset_with_ring_reset() -> None:
    rig = make_rig(2, extra_features=bit(VIRTIO_F_RING_RESET))
    dqs = bring_up(rig)
    assert roundtrip(rig, dqs[1], b"before") == b"erofeb"
    rig.w(QUEUE_SEL, 1)
    rig.w(QUEUE_RESET, 1)
    assert rig.r(QUEUE_READY) == 0 and rig.r(QUEUE_RESET) == 0
    rig.w(QUEUE_NOTIFY, 1)  # a notify on the reset queue reaches nothing
    assert not rig.r(STATUS) & DEVICE_NEEDS_RESET
    new = setup_queue(rig, 1)  # re-enabled with a fresh ring while the device runs
    assert roundtrip(rig, new, b"after") == b"retfa"
    assert roundtrip(rig, dqs[0], b"other") == b"rehto"


def test_queue_reset_without_ring_reset_is_ignored() -> None:
    rig = make_rig(2)
    dqs = bring_up(rig)
    rig.w(QUEUE_SEL, 0)
    rig.w(QUEUE_RESET, 1)
    assert rig.r(QUEUE_READY) == 1
    assert roundtrip(rig, dqs[0], b"x") == b"x"


def test_magic_survives_everything_above() -> None:
    rig = make_rig(2)
    bring_up(rig)
    rig.window.device_fault("test")
    assert rig.r(MAGIC_VALUE) == MAGIC_VALUE_VIRT


@pytest.mark.parametrize("where", ["desc", "misaligned"])
def test_queue_config_fault_names_its_queue_once(where: str) -> None:
    """Issue 15 item 7: the window's queue faults read "queue 1: queue 1: ...". """
    with structlog.testing.capture_logs() as logs:
        rig = make_rig(2)
        negotiate(rig)
        rig.w(QUEUE_SEL, 1)
        rig.w(QUEUE_NUM, 4)
        if where == "desc":
            rig.w(QUEUE_DESC_LOW, 0)  # far below guest RAM
            rig.w(QUEUE_DRIVER_LOW, RAM_BASE)
            rig.w(QUEUE_DEVICE_LOW, RAM_BASE + PAGE)
        else:
            rig.w(QUEUE_DESC_LOW, RAM_BASE + 8)  # not 16-byte aligned
        rig.w(QUEUE_READY, 1)
    assert rig.r(STATUS) & DEVICE_NEEDS_RESET
    for name in ("guest_protocol_violation", "device_needs_reset"):
        reason = events(logs, name)[0]["reason"]
        assert reason.startswith("queue 1: ") and reason.count("queue 1:") == 1, reason
