"""A virtio-mmio window's part of the device state record, and its resume (docs/restart.md).

`WindowState` ties one `VirtioMmio` to its `WindowRecord` (vmmiod/state/store.py). `save()`
records the registers the driver set (status, features and their selectors, queue set-up,
ConfigGeneration, a pending config interrupt) and the device's own state (`export_state()`).
It runs after every register write that can change them (the window's writers are wrapped
here; QueueNotify and InterruptAck change nothing recorded and are left alone), when the window
sets DEVICE_NEEDS_RESET, and when the device says its state changed (`state_changed()`), each
time before the IOREQ completes or the guest is interrupted. Enabled queues get their area of
the record (vmmiod/virtqueue/record.py).

`resume()` puts a window back as the dead daemon left it: registers, queues activated on the
same rings and recovered from their records, the device activated with its state and the
chains it had in flight, then one interrupt (one may have been lost with the process).
Everything read from the file is checked like a register write from the guest would be.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmmiod.memory import GuestMemory
from vmmiod.mmio_regs import (
    DEVICE_NEEDS_RESET,
    DRIVER_OK,
    FAILED,
    INTERRUPT_ACK,
    QUEUE_NOTIFY,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
)
from vmmiod.state.store import RecordRefused, WindowRecord
from vmmiod.virtqueue import DescriptorChain
from vmmiod.virtqueue.record import QueueRecord
from vmmiod.virtqueue.recorded import RecordedQueue

if TYPE_CHECKING:
    from vmmiod.mmio import VirtioMmio

STATE_VERSION = 1  # of the JSON below; a reader of a later one keeps reading this
_REGS = ("status", "device_features_sel", "driver_features_sel", "driver_features", "features",
         "queue_sel", "shm_sel", "config_generation", "guest_page_size")
_QUEUE_REGS = ("queue_sel", "guest_page_size")  # held by the window's QueueRegisters
U32 = 0xFFFF_FFFF


def _int(data: dict[str, Any], key: str, limit: int = (1 << 64) - 1) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise RecordRefused("corrupt", f"window state {key!r} is {value!r}")
    return value


def _owner(w: VirtioMmio, name: str) -> Any:
    """The object holding register `name`: the window, or its queue registers."""
    return w.queue_regs if name in _QUEUE_REGS else w


class WindowState:
    def __init__(self, window: VirtioMmio, record: WindowRecord) -> None:
        self.window = window
        self.record = record
        writers = window._writers
        for offset, writer in list(writers.items()):
            if offset not in (QUEUE_NOTIFY, INTERRUPT_ACK):
                writers[offset] = self._recorded(writer)

    def _recorded(self, writer: Callable[[int], None]) -> Callable[[int], None]:
        def write(value: int) -> None:
            writer(value)
            self.save()
        return write

    # -- recording ---------------------------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        w = self.window
        out: dict[str, Any] = {name: getattr(_owner(w, name), name) for name in _REGS}
        out.update({
            "v": STATE_VERSION, "type": w.device.type_name, "version": w.version,
            "queue_align": list(w.queue_regs.queue_align),
            "queue_pfn": list(w.queue_regs.queue_pfn),
            "config_interrupt": bool(w.interrupt_status & VIRTIO_MMIO_INT_CONFIG),
            "queues": [[q.size, q.desc_addr, q.avail_addr, q.used_addr, int(q.ready),
                        int(q.event_idx), int(q.indirect)] for q in w.queues],
            "device": w.device.export_state() if w.device.active else {},
        })
        return out

    def save(self) -> None:
        self.record.commit(self.export())

    def queue_enabled(self, q: RecordedQueue) -> None:
        if not self.record.frozen:
            q.attach_record(QueueRecord(self.record.queue_areas[q.index], q.max_size))

    # -- resuming ----------------------------------------------------------------------------------
    def resume(self, data: dict[str, Any], memory: GuestMemory) -> int:
        """Restore the window from `data` (its recorded state) on `memory`; returns the number of
        chains handed to the device again. RecordRefused / VirtqueueError: the caller resets."""
        w = self.window
        if data.get("v") != STATE_VERSION:
            raise RecordRefused("version", f"window state version {data.get('v')!r}, this "
                                f"vmmiod reads {STATE_VERSION}")
        if data.get("type") != w.device.type_name or data.get("version") != w.version:
            raise RecordRefused("layout", f"window was a {data.get('type')!r} device, version "
                                f"{data.get('version')!r}")
        queues = data.get("queues")
        if not isinstance(queues, list) or len(queues) != len(w.queues):
            raise RecordRefused("layout", "window's queue count differs")
        regs = {name: _int(data, name, (1 << 64) - 1 if "features" in name and "sel" not in name
                           else U32) for name in _REGS}
        if regs["driver_features"] & ~w.offered_features or regs["features"] & ~w.offered_features:
            raise RecordRefused("features", "the guest negotiated features this vmmiod no longer "
                                f"offers ({regs['features'] & ~w.offered_features:#x})")
        for name, value in regs.items():
            setattr(_owner(w, name), name, value)
        for name in ("queue_align", "queue_pfn"):
            values = data.get(name)
            if not isinstance(values, list) or len(values) != len(w.queues) or not all(
                    isinstance(v, int) and 0 <= v <= U32 for v in values):
                raise RecordRefused("corrupt", f"window state {name!r}")
            setattr(w.queue_regs, name, list(values))
        w.memory = memory
        found: dict[int, list[DescriptorChain]] = {}
        done: dict[int, list[tuple[int, int]]] = {}
        for q, spec in zip(w.queues, queues):
            if not isinstance(spec, list) or len(spec) != 7 or not all(
                    isinstance(v, int) and 0 <= v < 1 << 64 for v in spec):
                raise RecordRefused("corrupt", f"queue {q.index} state {spec!r}")
            q.size, q.desc_addr, q.avail_addr, q.used_addr = spec[:4]
            if not spec[4]:
                continue
            q.activate(memory, event_idx=bool(spec[5]), indirect=bool(spec[6]))
            assert isinstance(q, RecordedQueue)
            done[q.index], found[q.index] = q.resume(
                QueueRecord(self.record.queue_areas[q.index], q.max_size))
        status = w.status
        resumed = 0
        if status & DRIVER_OK and not status & (FAILED | DEVICE_NEEDS_RESET):
            device = w.device
            device.activate(memory, w.queues, w.features, w)
            device_state = data.get("device")
            device.import_state(device_state if isinstance(device_state, dict) else {})
            for index, heads in done.items():
                for head, length in heads:
                    w.queues[index].add_used(head, length)
            for q in w.queues:  # before any new work: the one interrupt below covers these
                if q.ready:
                    q.publish_used()
            device.resume(found)
            resumed = sum(len(c) for c in found.values())
        self.save()
        if status & DRIVER_OK:
            # An interrupt the dead daemon raised may never have reached the guest: one more.
            bits = VIRTIO_MMIO_INT_VRING
            if data.get("config_interrupt") or status & DEVICE_NEEDS_RESET:
                bits |= VIRTIO_MMIO_INT_CONFIG
            w.interrupt_status |= bits
            w.interrupts += 1
            w.irq_line.raise_()
        return resumed
