"""What hypervisor adaptors, the register window and devices share: a neutral module.

Adaptors never import devices and devices never import adaptors (docs/architecture.md); the few
things both sides speak of live here and import neither: the transport feature bits, the
guest interrupt line an adaptor provides, the transport a device talks back through, and what
an adaptor may ask of a virtio window on the bus.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# Reserved feature bits, common to every device type and owned by the transport and the ring
# (VIRTIO 1.2, section 6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_RING_RESET = 40


def bit(n: int) -> int:
    return 1 << n


class InterruptLine(Protocol):
    """A guest interrupt line, provided by the hypervisor adaptor.

    `raise_()` is called whenever the window sets an InterruptStatus bit; a level line asserts
    (idempotently), an edge line (Xen on Arm) sends one edge. `lower()` is called when
    InterruptStatus returns to 0 after an ACK; edge lines ignore it.
    """

    def raise_(self) -> None: ...

    def lower(self) -> None: ...


class Transport(Protocol):
    """What a device may ask of its transport. Implemented by the virtio-mmio window."""

    def signal_used(self, queue_index: int) -> None:
        """Used buffers were published on a queue and the driver must be notified."""

    def signal_config_change(self) -> None:
        """Config space changed: bump ConfigGeneration and raise a config interrupt."""

    def device_fault(self, reason: str) -> None:
        """Set DEVICE_NEEDS_RESET and raise a config interrupt (VIRTIO 1.2, 2.1.2)."""


@runtime_checkable
class VirtioWindow(Protocol):
    """What an adaptor may ask of a virtio window on the bus (vmmiod.mmio.VirtioMmio is one),
    beyond the register accesses the bus makes (vmmiod.bus.Window): never its device."""

    def queue_count(self) -> int:
        """How many virtqueues the window's device has (QueueSel 0 .. count - 1)."""
        ...


def queue_count(window: object) -> int:
    """The queue count of a window on the bus; 0 for a window that is not a virtio window."""
    return window.queue_count() if isinstance(window, VirtioWindow) else 0
