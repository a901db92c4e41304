"""The virtio-mmio register window (VIRTIO 1.2, 4.2): version 2, and legacy version 1.

Sans-IO, in the manner of h11: `read(offset, size)` and `write(offset, size, value)` take and
return numbers; the window calls its device (vmmiod/devices/base.py) and its InterruptLine and
does no I/O of its own. Every value the guest writes is untrusted: a bad access is ignored and
logged (rate-limited, `mmio_access_ignored`), a broken queue configuration sets
DEVICE_NEEDS_RESET (`guest_protocol_violation`); nothing raises out of the window.

Offsets, bits and the status transition table are in vmmiod/mmio_regs.py; the queue
registers are a QueueRegisters (vmmiod/mmio_queues.py) the window owns.
"""

from __future__ import annotations

from typing import Any

from vmmiod.devices.base import VirtioDevice
from vmmiod.memory import GuestMemory
from vmmiod.mmio_queues import U32_MASK, QueueRegisters, Readers, Writers
from vmmiod.mmio_regs import (
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
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MAGIC_VALUE,
    MAGIC_VALUE_VIRT,
    SHM_BASE_HIGH,
    SHM_BASE_LOW,
    SHM_LEN_HIGH,
    SHM_LEN_LOW,
    SHM_NO_REGION,
    SHM_SEL,
    STATUS,
    STATUS_MASK,
    TRANSITIONS_V1,
    TRANSITIONS_V2,
    VENDOR_ID,
    VENDOR_ID_VALUE,
    VERSION,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    register_name,
)
from vmmiod.transport import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    InterruptLine,
)
from vmmiod.virtqueue import SplitQueue
from vmmiod.virtqueue.recorded import RecordedQueue

_CONFIG_SIZES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
_VERSION_1 = 1 << VIRTIO_F_VERSION_1
_ACCESS_PLATFORM = 1 << VIRTIO_F_ACCESS_PLATFORM


class VirtioMmio:
    """One device's register window. Implements `Transport` for its device."""

    def __init__(self, device: VirtioDevice, irq_line: InterruptLine, *, version: int = 2,
                 log: Any = None) -> None:
        if version not in (1, 2):
            raise ValueError(f"virtio-mmio version {version} is neither 1 nor 2")
        self.device = device
        self.irq_line = irq_line
        self.version = version
        self.legacy = version == 1
        self.log = log if log is not None else device.log
        self.queues: list[SplitQueue] = [
            RecordedQueue(n, i) for i, n in enumerate(device.queue_max_sizes)]
        self.state: Any = None  # vmmiod.mmio_state.WindowState: the daemon keeps a record
        self.memory: GuestMemory | None = None
        self.config_generation = 0
        self.ignored: dict[str, int] = {}  # reason -> count of ignored accesses
        self.interrupts = self.reads = self.writes = 0  # raised; register accesses (IOREQs)
        self.queue_regs = QueueRegisters(self, device, self.queues, legacy=self.legacy,
                                         log=self.log)
        self._readers, self._writers = self._register_tables()
        self._reset_registers()

    # -- register tables ---------------------------------------------------------------------------
    def _register_tables(self) -> tuple[Readers, Writers]:
        readers: Readers = {
            MAGIC_VALUE: lambda: MAGIC_VALUE_VIRT,
            VERSION: lambda: self.version,
            DEVICE_ID: lambda: self.device.device_id,
            VENDOR_ID: lambda: VENDOR_ID_VALUE,
            DEVICE_FEATURES: self._read_device_features,
            INTERRUPT_STATUS: lambda: self.interrupt_status,
            STATUS: lambda: self.status,
        }
        writers: Writers = {
            DEVICE_FEATURES_SEL: self._write_device_features_sel,
            DRIVER_FEATURES: self._write_driver_features,
            DRIVER_FEATURES_SEL: self._write_driver_features_sel,
            INTERRUPT_ACK: self._write_interrupt_ack,
            STATUS: self._write_status,
        }
        if not self.legacy:
            readers[CONFIG_GENERATION] = lambda: self.config_generation
            for off in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
                readers[off] = lambda: SHM_NO_REGION
            writers[SHM_SEL] = self._write_shm_sel
        self.queue_regs.add_registers(readers, writers)
        return readers, writers

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0  # as written so far, masked to the offer
        self.features = 0  # committed at FEATURES_OK (legacy: at DRIVER_OK)
        self.shm_sel = 0
        self.interrupt_status = 0
        self.queue_regs.reset()
        offered = self.device.device_features()
        if self.legacy:  # a legacy transport cannot carry a VERSION_1 device
            offered &= ~_VERSION_1
        self.offered_features = offered

    # -- the sans-IO interface ---------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        if offset >= CONFIG:
            mask = _CONFIG_SIZES.get(size)
            if mask is None:
                self.ignore("access_size", offset, size)
                return 0
            return self.device.read_config(offset - CONFIG, size) & mask
        if size != 4:  # QEMU and Firecracker ignore these too; Linux never makes them
            self.ignore("access_size", offset, size)
            return 0
        reader = self._readers.get(offset)
        if reader is None:
            self.ignore("write_only" if offset in self._writers else "unknown_register",
                         offset, size)
            return 0
        return reader()

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        if offset >= CONFIG:
            mask = _CONFIG_SIZES.get(size)
            if mask is None:
                self.ignore("access_size", offset, size, value)
                return
            self.device.write_config(offset - CONFIG, size, value & mask)
            return
        if size != 4:
            self.ignore("access_size", offset, size, value)
            return
        writer = self._writers.get(offset)
        if writer is None:
            self.ignore("read_only" if offset in self._readers else "unknown_register",
                         offset, size, value)
            return
        writer(value & U32_MASK)

    def attach(self, memory: GuestMemory) -> None:
        self.memory = memory

    def detach(self) -> None:
        """The VMM (and with it guest memory) went away: reset as if the driver wrote Status 0."""
        self._reset()
        self.memory = None
        self.queue_regs.guest_page_size = 0

    # -- Transport (called by the device) ----------------------------------------------------------
    def queue_count(self) -> int:
        """vmmiod.transport.VirtioWindow: for adaptors, which never look at the device."""
        return len(self.queues)

    def signal_used(self, queue_index: int) -> None:
        self._interrupt(VIRTIO_MMIO_INT_VRING)

    def signal_config_change(self) -> None:
        # Linux rereads 64-bit fields until ConfigGeneration is stable: bump it on every change.
        self.config_generation = (self.config_generation + 1) & U32_MASK
        if self.status & DRIVER_OK:  # QEMU: no config interrupt before DRIVER_OK
            self._interrupt(VIRTIO_MMIO_INT_CONFIG)

    def device_fault(self, reason: str) -> None:
        """DEVICE_NEEDS_RESET and a config interrupt (2.1.2); the driver decides what to do."""
        if self.status & DEVICE_NEEDS_RESET:
            return
        self.status |= DEVICE_NEEDS_RESET
        self.log.warning("device_needs_reset", reason=reason)
        if self.state is not None:  # recorded before the guest can see it
            self.state.save()
        self._interrupt(VIRTIO_MMIO_INT_CONFIG)

    # -- internals ---------------------------------------------------------------------------------
    def _interrupt(self, bit: int) -> None:
        self.interrupt_status |= bit
        self.interrupts += 1
        self.irq_line.raise_()

    def ignore(self, reason: str, offset: int, size: int, value: int | None = None,
                **context: Any) -> None:
        n = self.ignored.get(reason, 0) + 1
        self.ignored[reason] = n
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a looping guest cannot flood the log
            self.log.warning("mmio_access_ignored", reason=reason,
                             register=register_name(offset), offset=offset, size=size,
                             value=value, count=n, **context)

    def protocol_fault(self, reason: str, **context: Any) -> None:
        """A guest protocol violation the window itself found (bad queue configuration)."""
        if self.device.active:
            self.device.fault(reason, **context)  # logs, stops the device, calls device_fault
        else:
            self.log.warning("guest_protocol_violation", reason=reason, **context)
        self.device_fault(reason)

    def _reset(self) -> None:
        """Status 0: the device and every queue back to their initial state (2.1, 4.2.3.1)."""
        try:
            self.device.reset()
        except Exception as exc:  # a device bug; the window still resets
            self.log.exception("device_reset_error", error=type(exc).__name__)
        for q in self.queues:
            q.reset()
        had_interrupt = self.interrupt_status
        self._reset_registers()
        if had_interrupt:
            self.irq_line.lower()

    def _negotiating(self) -> bool:
        """Driver features may be written: DRIVER set, features not yet committed."""
        s = self.status
        done = FEATURES_OK | DRIVER_OK | FAILED | DEVICE_NEEDS_RESET
        return bool(s & DRIVER) and not s & done

    # -- readers -----------------------------------------------------------------------------------
    def _read_device_features(self) -> int:
        sel = self.device_features_sel
        return self.offered_features >> (32 * sel) & U32_MASK if sel < 2 else 0

    # -- writers: features -------------------------------------------------------------------------
    def _write_device_features_sel(self, value: int) -> None:
        self.device_features_sel = value

    def _write_driver_features_sel(self, value: int) -> None:
        self.driver_features_sel = value

    def _write_driver_features(self, value: int) -> None:
        sel = self.driver_features_sel
        if sel > 1:
            self.ignore("features_sel_out_of_range", DRIVER_FEATURES, 4, value, sel=sel)
            return
        if not self._negotiating():
            self.ignore("features_outside_negotiation", DRIVER_FEATURES, 4, value,
                         status=self.status)
            return
        offered = self.offered_features >> (32 * sel) & U32_MASK
        if value & ~offered:
            self.ignore("features_not_offered", DRIVER_FEATURES, 4, value,
                         not_offered=value & ~offered, sel=sel)
        half = value & offered  # replaced, not OR-ed: Linux may write the set twice
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(U32_MASK << shift)) | half << shift

    def _commit_features(self) -> bool:
        f = self.driver_features
        if not self.legacy and not f & _VERSION_1:
            reason = "VERSION_1 not accepted on a version 2 window"
        elif self.device.access_platform and not f & _ACCESS_PLATFORM:
            # Grant mode: every address the driver gives is a grant reference; a driver that
            # would hand out guest-physical addresses instead would fault on every access.
            reason = "ACCESS_PLATFORM (grant addresses) not accepted"
        elif not self.device.validate_features(f):
            reason = "device refused the feature set"
        else:
            self.features = f
            self.log.info("features_negotiated", features=f)
            return True
        self.log.warning("features_rejected", features=f, reason=reason)
        return False

    # -- writers: status and interrupts ------------------------------------------------------------
    def _write_shm_sel(self, value: int) -> None:
        self.shm_sel = value  # every region reads back "none"

    def _write_interrupt_ack(self, value: int) -> None:
        before = self.interrupt_status
        after = before & ~value
        self.interrupt_status = after
        if before and not after:
            self.irq_line.lower()

    def _write_status(self, value: int) -> None:
        value &= STATUS_MASK
        if value == 0:
            self._reset()
            return
        old = self.status
        current = old & ~DEVICE_NEEDS_RESET  # device-owned bit: drivers write it back in RMWs
        new = value & ~DEVICE_NEEDS_RESET
        if new == current:
            return
        if new == current | FAILED:  # the driver gives up (3.1.1); always allowed
            self.status = old | FAILED
            self.log.info("driver_failed", status=old)
            return
        table = TRANSITIONS_V1 if self.legacy else TRANSITIONS_V2
        if old & (FAILED | DEVICE_NEEDS_RESET) or new not in table.get(current, ()):
            self.ignore("status_transition", STATUS, 4, value, status=old)
            return
        added = new & ~current
        if added == FEATURES_OK and not self._commit_features():
            return  # refused: FEATURES_OK reads back clear and Linux gives up
        if added == DRIVER_OK:
            self._driver_ok(new)
            return
        self.status = new

    def _driver_ok(self, new: int) -> None:
        if self.legacy and not self.status & FEATURES_OK:
            # Legacy drivers have no FEATURES_OK step: commit (and let the device veto) here.
            if not self._commit_features():
                self.protocol_fault("legacy driver features refused at DRIVER_OK")
                return
            for q in self.queues:  # enabled at QueuePFN with the features of that moment
                q.event_idx = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
                q.indirect = bool(self.features >> VIRTIO_F_INDIRECT_DESC & 1)
        memory = self.memory
        if memory is None:
            self.protocol_fault("DRIVER_OK with no guest memory attached")
            return
        self.status = new
        try:
            self.device.activate(memory, self.queues, self.features, self)
        except Exception as exc:  # a device bug must not take the daemon down
            self.log.exception("device_activate_error", error=type(exc).__name__)
            self.protocol_fault(f"device activation failed: {exc}")
            return
        self.log.info("device_activated", features=self.features,
                      queues=[q.index for q in self.queues if q.ready])

    def stats(self) -> dict[str, int]:
        ignored = {f"ignored_{reason}": n for reason, n in self.ignored.items()}
        return {"interrupts": self.interrupts, "config_generation": self.config_generation,
                "reads": self.reads, "writes": self.writes, **ignored}
