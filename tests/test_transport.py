"""The neutral module adaptors and devices share (vmmiod/transport.py)."""

from __future__ import annotations

from vmmiod import transport
from vmmiod.devices import base as device_base
from vmmiod.devices.base import VirtioDevice
from vmmiod.mmio import VirtioMmio


class Line:
    def raise_(self) -> None:
        pass

    def lower(self) -> None:
        pass


def test_an_adaptor_learns_the_queue_count_from_the_window() -> None:
    window = VirtioMmio(VirtioDevice("d", [4, 8, 16]), Line())
    assert isinstance(window, transport.VirtioWindow)
    assert transport.queue_count(window) == 3


def test_a_window_that_is_not_virtio_has_no_queues() -> None:
    class RegistersOnly:
        def read(self, offset: int, size: int) -> int:
            return 0

    assert transport.queue_count(RegistersOnly()) == 0


def test_devices_base_still_offers_the_neutral_names() -> None:
    for name in ("VIRTIO_F_INDIRECT_DESC", "VIRTIO_F_EVENT_IDX", "VIRTIO_F_VERSION_1",
                 "VIRTIO_F_ACCESS_PLATFORM", "VIRTIO_F_RING_PACKED", "VIRTIO_F_RING_RESET",
                 "InterruptLine", "Transport", "bit"):
        assert getattr(device_base, name) is getattr(transport, name)
