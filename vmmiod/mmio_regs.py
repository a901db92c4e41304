"""virtio-mmio register offsets, status bits and the status transition table (VIRTIO 1.2, 4.2.2).

Names are the spec's. The table says which driver-written status values may follow which;
anything else is refused (Firecracker does the same). Status 0 (reset) and adding FAILED are
always accepted and handled before the table is consulted.
"""

from __future__ import annotations

MAGIC_VALUE_VIRT = 0x74726976  # "virt", little-endian
VENDOR_ID_VALUE = 0x554D4551  # "QEMU": what Linux and every device model report; drivers ignore it
WINDOW_SIZE = 0x200  # what Xen's xl allots to each device

# -- registers (all 32-bit, below CONFIG) ----------------------------------------------------------
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
GUEST_PAGE_SIZE = 0x028  # legacy only
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_ALIGN = 0x03C  # legacy only
QUEUE_PFN = 0x040  # legacy only
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090  # avail ring
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0  # used ring
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100  # device-specific configuration space starts here

REGISTER_NAMES = {
    v: k for k, v in globals().items()
    if k.isupper() and isinstance(v, int) and k not in (
        "MAGIC_VALUE_VIRT", "VENDOR_ID_VALUE", "WINDOW_SIZE", "CONFIG")
}

SHM_NO_REGION = 0xFFFF_FFFF  # each half of SHMLen/SHMBase reads ~0: "no such region"
DEFAULT_QUEUE_ALIGN = 4096  # legacy QueueAlign before the driver writes it (QEMU's default)

# -- device status (2.1) ---------------------------------------------------------------------------
ACKNOWLEDGE = 0x01
DRIVER = 0x02
DRIVER_OK = 0x04
FEATURES_OK = 0x08
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80
STATUS_MASK = 0xFF

# -- interrupt status ------------------------------------------------------------------------------
VIRTIO_MMIO_INT_VRING = 0x1  # used buffer notification
VIRTIO_MMIO_INT_CONFIG = 0x2  # configuration change (and DEVICE_NEEDS_RESET)
INTERRUPT_MASK = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG

# -- status transitions ----------------------------------------------------------------------------
_A, _D, _F, _OK = ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK

# Version 2: ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK, one step at a time (3.1.1).
TRANSITIONS_V2: dict[int, frozenset[int]] = {
    0: frozenset({_A}),
    _A: frozenset({_A | _D}),
    _A | _D: frozenset({_A | _D | _F}),
    _A | _D | _F: frozenset({_A | _D | _F | _OK}),
}

# Legacy (version 1): there is no FEATURES_OK step (Linux skips it without VERSION_1), so
# DRIVER_OK follows DRIVER; a driver that does set FEATURES_OK is tolerated.
TRANSITIONS_V1: dict[int, frozenset[int]] = {
    0: frozenset({_A}),
    _A: frozenset({_A | _D}),
    _A | _D: frozenset({_A | _D | _F, _A | _D | _OK}),
    _A | _D | _F: frozenset({_A | _D | _F | _OK}),
}


def register_name(offset: int) -> str:
    if offset >= CONFIG:
        return f"config+{offset - CONFIG:#x}"
    return REGISTER_NAMES.get(offset, f"{offset:#x}")
