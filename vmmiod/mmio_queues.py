"""The queue registers of the virtio-mmio window (VIRTIO 1.2, 4.2.2 and 4.2.4 legacy).

A mixin of `vmmiod.mmio.VirtioMmio`, kept apart because it is the one part of the window that
builds something: it turns QueueNum and the address registers (or, legacy, QueuePFN with
GuestPageSize and QueueAlign) into a configured `SplitQueue` and enables it. Every register
here acts on the queue chosen by QueueSel and may change only while that queue is not ready
and the driver has finished feature negotiation (4.2.3.2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmmiod.devices.base import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_RESET,
    VirtioDevice,
)
from vmmiod.memory import GuestMemory
from vmmiod.mmio_regs import (
    DEVICE_NEEDS_RESET,
    DRIVER,
    FAILED,
    FEATURES_OK,
    QUEUE_ALIGN,
    QUEUE_NOTIFY,
    QUEUE_NUM,
    QUEUE_PFN,
    QUEUE_READY,
    QUEUE_RESET,
)
from vmmiod.virtqueue import SplitQueue, VirtqueueError
from vmmiod.virtqueue.split import DESC_SIZE


def _power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


class QueueRegisters:
    """Queue register readers and writers; the state they use belongs to VirtioMmio."""

    # Provided by VirtioMmio.
    device: VirtioDevice
    log: Any
    legacy: bool
    memory: GuestMemory | None
    queues: list[SplitQueue]
    status: int
    features: int
    driver_features: int
    queue_sel: int
    queue_align: list[int]
    queue_pfn: list[int]
    guest_page_size: int
    state: Any  # vmmiod.mmio_state.WindowState or None

    def _ignore(self, reason: str, offset: int, size: int, value: int | None = None,
                **context: Any) -> None:
        raise NotImplementedError

    def _fault(self, reason: str, **context: Any) -> None:
        raise NotImplementedError

    def _selected_queue(self) -> SplitQueue | None:
        sel = self.queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def _queue_writable(self, offset: int, value: int) -> SplitQueue | None:
        """The selected queue if its registers may change now (4.2.3.2), else None (logged)."""
        q = self._selected_queue()
        if q is None:
            self._ignore("queue_sel_out_of_range", offset, 4, value, queue=self.queue_sel)
            return None
        s = self.status
        setup_done = s & DRIVER if self.legacy else s & FEATURES_OK
        if not setup_done or s & (FAILED | DEVICE_NEEDS_RESET):
            self._ignore("queue_write_before_setup", offset, 4, value, status=s)
            return None
        if q.ready:
            self._ignore("queue_write_while_ready", offset, 4, value, queue=q.index)
            return None
        return q

    def _activate_queue(self, q: SplitQueue, features: int) -> bool:
        memory = self.memory
        if memory is None:
            self._fault("queue enabled with no guest memory attached", queue=q.index)
            return False
        try:
            q.check_config()
            q.activate(memory, event_idx=bool(features >> VIRTIO_F_EVENT_IDX & 1),
                       indirect=bool(features >> VIRTIO_F_INDIRECT_DESC & 1))
        except VirtqueueError as exc:
            q.ready = False
            self._fault(str(exc), queue=q.index, rule=exc.rule)  # names its queue
            return False
        if self.state is not None:
            self.state.queue_enabled(q)
        self.log.info("queue_ready", queue=q.index, size=q.size, desc=q.desc_addr,
                      avail=q.avail_addr, used=q.used_addr)
        return True

    def _read_queue_num_max(self) -> int:
        q = self._selected_queue()
        return q.max_size if q is not None else 0  # 0: no such queue (Linux stops probing)

    def _read_queue_ready(self) -> int:
        q = self._selected_queue()
        return 1 if q is not None and q.ready else 0

    def _read_queue_pfn(self) -> int:
        sel = self.queue_sel
        return self.queue_pfn[sel] if sel < len(self.queues) else 0

    # -- writers: queues ---------------------------------------------------------------------------
    def _write_queue_sel(self, value: int) -> None:
        self.queue_sel = value  # kept even when out of range: QueueNumMax then reads 0

    def _write_queue_num(self, value: int) -> None:
        q = self._queue_writable(QUEUE_NUM, value)
        if q is not None:
            q.size = value  # checked by check_config() when the queue is enabled

    def _queue_address_writer(self, offset: int, attr: str,
                              setter: Callable[[int, int], int]) -> Callable[[int], None]:
        def write(value: int) -> None:
            q = self._queue_writable(offset, value)
            if q is not None:
                setattr(q, attr, setter(getattr(q, attr), value))
        return write

    def _write_queue_ready(self, value: int) -> None:
        q = self._selected_queue()
        if not value:
            # Linux disables each queue at teardown and reads back 0 (4.2.3.2).
            if q is not None and q.ready:
                q.reset()
                self.device.on_queue_reset(q.index)
                self.log.info("queue_disabled", queue=q.index)
            return
        q = self._queue_writable(QUEUE_READY, value)
        if q is not None:
            self._activate_queue(q, self.features)

    def _write_queue_reset(self, value: int) -> None:
        q = self._selected_queue()
        if not value & 1 or q is None or not self.features >> VIRTIO_F_RING_RESET & 1:
            self._ignore("queue_reset_refused", QUEUE_RESET, 4, value, queue=self.queue_sel)
            return
        q.reset()  # QueueReady and QueueReset both read 0 afterwards (2.6.1)
        self.device.on_queue_reset(q.index)
        self.log.info("queue_reset", queue=q.index)

    def _write_queue_notify(self, value: int) -> None:
        queues = self.queues
        if value >= len(queues):
            self._ignore("notify_out_of_range", QUEUE_NOTIFY, 4, value)
        elif not queues[value].ready:
            self._ignore("notify_queue_not_ready", QUEUE_NOTIFY, 4, value)
        else:
            self.device.queue_notify(value)

    # -- writers: legacy queue layout --------------------------------------------------------------
    def _write_guest_page_size(self, value: int) -> None:
        self.guest_page_size = value  # checked when a QueuePFN uses it

    def _write_queue_align(self, value: int) -> None:
        q = self._queue_writable(QUEUE_ALIGN, value)
        if q is not None:
            self.queue_align[q.index] = value

    def _write_queue_pfn(self, value: int) -> None:
        if not value:
            q = self._selected_queue()
            if q is not None and (q.ready or self.queue_pfn[q.index]):
                q.reset()
                self.device.on_queue_reset(q.index)
                self.queue_pfn[q.index] = 0
                self.log.info("queue_disabled", queue=q.index)
            return
        q = self._queue_writable(QUEUE_PFN, value)
        if q is None:
            return
        page, align = self.guest_page_size, self.queue_align[q.index]
        if not _power_of_two(page) or not _power_of_two(align):
            self._fault(f"queue {q.index}: GuestPageSize {page} or QueueAlign {align} "
                        "is not a power of two", queue=q.index)
            return
        # Legacy layout: descriptors, then the avail ring, then the used ring at the next
        # QueueAlign boundary (virtio 0.9.5 2.3; Linux's vring_init).
        n = q.size
        q.desc_addr = value * page
        q.avail_addr = q.desc_addr + DESC_SIZE * n
        avail_end = q.avail_addr + 2 * (3 + n)
        q.used_addr = (avail_end + align - 1) & ~(align - 1)
        if self._activate_queue(q, self.driver_features):
            self.queue_pfn[q.index] = value
