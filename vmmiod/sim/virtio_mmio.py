"""Guest-side virtio-mmio transport driver, step for step like Linux's drivers/virtio/virtio_mmio.c.

The guest's own copy of the register map (the spec's names): the sim checks the daemon's window
from the outside, so it does not borrow the daemon's constants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vmmiod.hypervisors.generic.protocol import Window
from vmmiod.sim.vmm import SimError, SimVmm
from vmmiod.sim.vring import DriverQueue

MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
GUEST_PAGE_SIZE = 0x028  # legacy
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_ALIGN = 0x03C  # legacy
QUEUE_PFN = 0x040  # legacy
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MAGIC = 0x74726976  # "virt"
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80
INT_VRING = 1 << 0
INT_CONFIG = 1 << 1

VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
# What Linux's vring_transport_features() keeps of the transport bits (no packed ring here).
TRANSPORT_FEATURES = (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX) | (
    1 << VIRTIO_F_VERSION_1)
LEGACY_PAGE_SIZE = 4096
LEGACY_ALIGN = 4096
CONFIG_RETRIES = 16


class DeviceFailed(SimError):
    """The device refused a step of initialisation or set DEVICE_NEEDS_RESET."""


class VirtioMmioDriver:
    """One virtio-mmio device as the Linux transport driver drives it."""

    def __init__(self, vmm: SimVmm, window: Window, vcpu: int = 0) -> None:
        self.vmm = vmm
        self.window = window
        self.base = window.base
        self.vcpu = vcpu
        self.version = 0
        self.device_id = 0
        self.vendor_id = 0
        self.device_features = 0
        self.features = 0
        self.queues: list[DriverQueue] = []
        self.interrupts = 0
        self.config_changes = 0

    def r32(self, off: int) -> int:
        return self.vmm.read(self.base + off, 4, self.vcpu)

    def w32(self, off: int, value: int) -> None:
        self.vmm.write(self.base + off, value, 4, self.vcpu)

    # -- vm_probe ----------------------------------------------------------------------------------
    def probe(self) -> int:
        """Magic, Version, DeviceID, VendorID; returns the device id (0: no device here)."""
        magic = self.r32(MAGIC_VALUE)
        if magic != MAGIC:
            raise DeviceFailed(f"{self.base:#x}: wrong magic value {magic:#x}")
        self.version = self.r32(VERSION)
        if self.version not in (1, 2):
            raise DeviceFailed(f"{self.base:#x}: version {self.version} not supported")
        self.device_id = self.r32(DEVICE_ID)
        if self.device_id == 0:
            return 0
        self.vendor_id = self.r32(VENDOR_ID)
        if self.version == 1:
            self.w32(GUEST_PAGE_SIZE, LEGACY_PAGE_SIZE)
        return self.device_id

    # -- status ------------------------------------------------------------------------------------
    def get_status(self) -> int:
        return self.r32(STATUS) & 0xFF

    def add_status(self, bits: int) -> None:
        """virtio_add_status: a read-modify-write, as Linux does."""
        self.w32(STATUS, self.get_status() | bits)

    def reset(self) -> None:
        self.w32(STATUS, 0)

    # -- virtio_dev_probe: reset, ACK, DRIVER, features, FEATURES_OK -------------------------------
    def negotiate(self, driver_supported: int) -> int:
        """Reset and negotiate; returns the features in force. Raises DeviceFailed."""
        self.reset()
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        self.w32(DEVICE_FEATURES_SEL, 1)
        high = self.r32(DEVICE_FEATURES)
        self.w32(DEVICE_FEATURES_SEL, 0)
        low = self.r32(DEVICE_FEATURES)
        self.device_features = high << 32 | low
        wanted = driver_supported | TRANSPORT_FEATURES
        features = self.device_features & wanted
        if self.version == 2 and not features >> VIRTIO_F_VERSION_1 & 1:
            self.add_status(STATUS_FAILED)
            raise DeviceFailed(f"{self.base:#x}: device does not offer VIRTIO_F_VERSION_1")
        self.w32(DRIVER_FEATURES_SEL, 1)
        self.w32(DRIVER_FEATURES, features >> 32)
        self.w32(DRIVER_FEATURES_SEL, 0)
        self.w32(DRIVER_FEATURES, features & 0xFFFFFFFF)
        if self.version == 2:
            self.add_status(STATUS_FEATURES_OK)
            if not self.get_status() & STATUS_FEATURES_OK:
                self.add_status(STATUS_FAILED)
                raise DeviceFailed(f"{self.base:#x}: device did not accept features {features:#x}")
        self.features = features
        return features

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    # -- vm_setup_vq -------------------------------------------------------------------------------
    def setup_queue(self, index: int, size: int) -> DriverQueue:
        self.w32(QUEUE_SEL, index)
        if self.r32(QUEUE_READY if self.version == 2 else QUEUE_PFN):
            raise DeviceFailed(f"{self.base:#x}: queue {index} is already set up")
        num_max = self.r32(QUEUE_NUM_MAX)
        if num_max == 0:
            raise DeviceFailed(f"{self.base:#x}: queue {index} does not exist")
        num = min(size, num_max)
        legacy = LEGACY_ALIGN if self.version == 1 else None
        q = DriverQueue(self.vmm.memory, self.vmm.alloc, num, index=index,
                        event_idx=self.has(VIRTIO_F_EVENT_IDX),
                        indirect=self.has(VIRTIO_F_INDIRECT_DESC), legacy_align=legacy)
        self.w32(QUEUE_NUM, num)
        if self.version == 1:
            self.w32(QUEUE_ALIGN, LEGACY_ALIGN)
            self.w32(QUEUE_PFN, q.desc_addr // LEGACY_PAGE_SIZE)
        else:
            for low, addr in ((QUEUE_DESC_LOW, q.desc_addr), (QUEUE_DRIVER_LOW, q.avail_addr),
                              (QUEUE_DEVICE_LOW, q.used_addr)):
                self.w32(low, addr & 0xFFFFFFFF)
                self.w32(low + 4, addr >> 32)
            self.w32(QUEUE_READY, 1)
        while len(self.queues) <= index:
            self.queues.append(None)  # type: ignore[arg-type]
        self.queues[index] = q
        return q

    def setup_queues(self, sizes: Sequence[int]) -> list[DriverQueue]:
        return [self.setup_queue(i, n) for i, n in enumerate(sizes)]

    def driver_ok(self) -> None:
        self.add_status(STATUS_DRIVER_OK)
        if self.get_status() & STATUS_DEVICE_NEEDS_RESET:
            raise DeviceFailed(f"{self.base:#x}: device needs reset right after DRIVER_OK")

    # -- runtime -----------------------------------------------------------------------------------
    def notify(self, index: int) -> None:
        self.w32(QUEUE_NOTIFY, index)

    def kick(self, q: DriverQueue) -> bool:
        """virtqueue_kick: publish avail entries, notify only if the device asked."""
        if q.kick_prepare():
            self.notify(q.index)
            return True
        return False

    def interrupt(self) -> int:
        """vm_interrupt: read InterruptStatus, ACK the same bits; returns them."""
        isr = self.r32(INTERRUPT_STATUS)
        if isr:
            self.w32(INTERRUPT_ACK, isr)
        if isr & INT_CONFIG:
            self.config_changes += 1
            if self.get_status() & STATUS_DEVICE_NEEDS_RESET:
                raise DeviceFailed(f"{self.base:#x}: device set DEVICE_NEEDS_RESET")
        return isr

    def wait(self, ready: Callable[[], bool], timeout: float | None = None) -> None:
        """Sleep on the interrupt line until `ready()` holds (checked before each sleep)."""
        while not ready():
            if not self.vmm.wait_irq(self.window.irq, timeout):
                raise SimError(f"{self.base:#x}: no interrupt within "
                               f"{self.vmm.timeout if timeout is None else timeout} s")
            self.interrupts += 1
            self.interrupt()

    # -- config space ------------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        return self.vmm.read(self.base + CONFIG + offset, size, self.vcpu)

    def config_read64(self, offset: int) -> int:
        """Two 32-bit halves inside a ConfigGeneration retry loop (virtio_cread64)."""
        for _ in range(CONFIG_RETRIES):
            gen = self.r32(CONFIG_GENERATION) if self.version == 2 else 0
            low = self.config_read(offset, 4)
            high = self.config_read(offset + 4, 4)
            if self.version == 1 or self.r32(CONFIG_GENERATION) == gen:
                return high << 32 | low
        raise DeviceFailed(f"{self.base:#x}: config generation never settles")

    # -- vm_del_vq and reset -----------------------------------------------------------------------
    def teardown(self) -> None:
        """virtio_reset_device, then vm_del_vqs (Linux's remove order)."""
        self.reset()
        for q in self.queues:
            if q is None:
                continue
            self.w32(QUEUE_SEL, q.index)
            if self.version == 2:
                self.w32(QUEUE_READY, 0)
                if self.r32(QUEUE_READY):
                    raise DeviceFailed(f"{self.base:#x}: queue {q.index} stays ready after reset")
            else:
                self.w32(QUEUE_PFN, 0)
        self.queues = []
