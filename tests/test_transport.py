"""The neutral module adaptors and devices share (vmmiod/transport.py)."""

from __future__ import annotations

from vmmiod import transport
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
