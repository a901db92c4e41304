"""The queue registers of the virtio-mmio window (VIRTIO 1.2, 4.2.2 and 4.2.4 legacy).

`QueueRegisters` is owned by the window (vmmiod/mmio.py) and is the one part of it that builds
something: it turns QueueNum and the address registers (or, legacy, QueuePFN with
GuestPageSize and QueueAlign) into a configured `SplitQueue` and enables it. Every register
here acts on the queue chosen by QueueSel and may change only while that queue is not ready
and the driver has finished feature negotiation (4.2.3.2). It holds the queue-side registers
(QueueSel, QueueAlign and QueuePFN per queue, GuestPageSize); what it needs of the window
(status, features, memory, the record, how to ignore an access or fault the device) it asks
through `QueueWindow`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vmmiod.devices.base import VirtioDevice
from vmmiod.memory import GuestMemory
from vmmiod.mmio_regs import (
    DEFAULT_QUEUE_ALIGN,
    DEVICE_NEEDS_RESET,
    DRIVER,
    FAILED,
    FEATURES_OK,
    GUEST_PAGE_SIZE,
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
    QUEUE_RESET,
    QUEUE_SEL,
)
from vmmiod.transport import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_RESET
from vmmiod.virtqueue import SplitQueue, VirtqueueError
from vmmiod.virtqueue.split import DESC_SIZE

U32_MASK = 0xFFFF_FFFF
Readers = dict[int, Callable[[], int]]
Writers = dict[int, Callable[[int], None]]


def _power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def _set_low(old: int, value: int) -> int:
    return (old & ~U32_MASK) | value


def _set_high(old: int, value: int) -> int:
    return (old & U32_MASK) | value << 32


class QueueWindow(Protocol):
    """What the queue registers ask of their window."""

    status: int
    features: int  # committed at FEATURES_OK
    driver_features: int  # as written so far (legacy queues are enabled before DRIVER_OK)
    memory: GuestMemory | None
    state: Any  # vmmiod.mmio_state.WindowState or None

    def ignore(self, reason: str, offset: int, size: int, value: int | None = None,
               **context: Any) -> None: ...

    def protocol_fault(self, reason: str, **context: Any) -> None: ...


class QueueRegisters:
    """The queue registers of one window: their readers, writers and state."""

    def __init__(self, window: QueueWindow, device: VirtioDevice, queues: Sequence[SplitQueue],
                 *, legacy: bool, log: Any) -> None:
        self.window = window
        self.device = device
        self.queues = queues
        self.legacy = legacy
        self.log = log
        self.guest_page_size = 0  # legacy; written once by Linux at probe, so it survives resets
        self.reset()

    def reset(self) -> None:
        self.queue_sel = 0
        self.queue_align = [DEFAULT_QUEUE_ALIGN] * len(self.queues)
        self.queue_pfn = [0] * len(self.queues)

    def add_registers(self, readers: Readers, writers: Writers) -> None:
        """Put this window version's queue registers into the window's tables."""
        readers[QUEUE_NUM_MAX] = self._read_queue_num_max
        writers[QUEUE_SEL] = self._write_queue_sel
        writers[QUEUE_NUM] = self._write_queue_num
        writers[QUEUE_NOTIFY] = self._write_queue_notify
        if self.legacy:
            readers[QUEUE_PFN] = self._read_queue_pfn
            writers[GUEST_PAGE_SIZE] = self._write_guest_page_size
            writers[QUEUE_ALIGN] = self._write_queue_align
            writers[QUEUE_PFN] = self._write_queue_pfn
            return
        readers[QUEUE_READY] = self._read_queue_ready
        readers[QUEUE_RESET] = lambda: 0  # a queue reset completes inside the write
        writers[QUEUE_READY] = self._write_queue_ready
        writers[QUEUE_RESET] = self._write_queue_reset
        for off, attr, setter in ((QUEUE_DESC_LOW, "desc_addr", _set_low),
                                  (QUEUE_DESC_HIGH, "desc_addr", _set_high),
                                  (QUEUE_DRIVER_LOW, "avail_addr", _set_low),
                                  (QUEUE_DRIVER_HIGH, "avail_addr", _set_high),
                                  (QUEUE_DEVICE_LOW, "used_addr", _set_low),
                                  (QUEUE_DEVICE_HIGH, "used_addr", _set_high)):
            writers[off] = self._queue_address_writer(off, attr, setter)

    def _selected_queue(self) -> SplitQueue | None:
        sel = self.queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def _queue_writable(self, offset: int, value: int) -> SplitQueue | None:
        """The selected queue if its registers may change now (4.2.3.2), else None (logged)."""
        q = self._selected_queue()
        if q is None:
            self.window.ignore("queue_sel_out_of_range", offset, 4, value, queue=self.queue_sel)
            return None
        s = self.window.status
        setup_done = s & DRIVER if self.legacy else s & FEATURES_OK
        if not setup_done or s & (FAILED | DEVICE_NEEDS_RESET):
            self.window.ignore("queue_write_before_setup", offset, 4, value, status=s)
            return None
        if q.ready:
            self.window.ignore("queue_write_while_ready", offset, 4, value, queue=q.index)
            return None
        return q

    def _activate_queue(self, q: SplitQueue, features: int) -> bool:
        memory = self.window.memory
        if memory is None:
            self.window.protocol_fault("queue enabled with no guest memory attached",
                                       queue=q.index)
            return False
        try:
            q.check_config()
            q.activate(memory, event_idx=bool(features >> VIRTIO_F_EVENT_IDX & 1),
                       indirect=bool(features >> VIRTIO_F_INDIRECT_DESC & 1))
        except VirtqueueError as exc:
            q.ready = False
            self.window.protocol_fault(str(exc), queue=q.index, rule=exc.rule)  # names its queue
            return False
        if self.window.state is not None:
            self.window.state.queue_enabled(q)
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
            self._activate_queue(q, self.window.features)

    def _write_queue_reset(self, value: int) -> None:
        q = self._selected_queue()
        if not value & 1 or q is None or not self.window.features >> VIRTIO_F_RING_RESET & 1:
            self.window.ignore("queue_reset_refused", QUEUE_RESET, 4, value, queue=self.queue_sel)
            return
        q.reset()  # QueueReady and QueueReset both read 0 afterwards (2.6.1)
        self.device.on_queue_reset(q.index)
        self.log.info("queue_reset", queue=q.index)

    def _write_queue_notify(self, value: int) -> None:
        queues = self.queues
        if value >= len(queues):
            self.window.ignore("notify_out_of_range", QUEUE_NOTIFY, 4, value)
        elif not queues[value].ready:
            self.window.ignore("notify_queue_not_ready", QUEUE_NOTIFY, 4, value)
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
            self.window.protocol_fault(f"queue {q.index}: GuestPageSize {page} or QueueAlign "
                                       f"{align} is not a power of two", queue=q.index)
            return
        # Legacy layout: descriptors, then the avail ring, then the used ring at the next
        # QueueAlign boundary (virtio 0.9.5 2.3; Linux's vring_init).
        n = q.size
        q.desc_addr = value * page
        q.avail_addr = q.desc_addr + DESC_SIZE * n
        avail_end = q.avail_addr + 2 * (3 + n)
        q.used_addr = (avail_end + align - 1) & ~(align - 1)
        if self._activate_queue(q, self.window.driver_features):
            self.queue_pfn[q.index] = value
