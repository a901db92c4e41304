"""Guest interrupt lines on Xen, and the optional privcmd IRQFD/IOEVENTFD fast path.

- Arm (`spi`): `set_irq_level(spi, 1)`. xl declares virtio-mmio interrupts edge-rising and the
  vGIC treats each level-1 call as one edge (a level-0 call does nothing), so `raise_()` is one
  call and `lower()` nothing.
- x86 (`isa`): ISA IRQs are edge-triggered in the guest, so `raise_()` pulses the line
  (assert, deassert); a line left asserted would swallow the next edge.
- x86 (`msi`): one MSI per `raise_()`, vector = the configured irq, fixed delivery to APIC 0.
- IRQFD (Linux >= 6.7, CONFIG_XEN_PRIVCMD_EVENTFD): the kernel runs a prepared dm_op whenever
  an eventfd is signalled, so `raise_()` is one eventfd write instead of a dm_op ioctl.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from typing import Any

from vmmiod.hypervisors.xen.abi import (
    ARM_FIRST_SPI,
    ARM_GIC_MAX_IRQ,
    IOCTL_PRIVCMD_IOEVENTFD,
    IOCTL_PRIVCMD_IRQFD,
    ISA_IRQ_MAX,
    MSI_ADDRESS_BASE,
    MSI_VECTOR_MAX,
    MSI_VECTOR_MIN,
    PRIVCMD_IOEVENTFD_FLAG_DEASSIGN,
    PRIVCMD_IRQFD_FLAG_DEASSIGN,
    XEN_DMOP_SET_IRQ_LEVEL,
    PrivcmdIoeventfd,
    PrivcmdIrqfd,
    XenDmOp,
    ioc,
)
from vmmiod.hypervisors.xen.handles import DeviceModel

IOCTL_PRIVCMD_RESTRICT = ioc(0, "P", 6, 2)  # _IOC(_IOC_NONE, 'P', 6, sizeof(domid_t))


class IrqRangeError(ValueError):
    """The configured irq cannot be raised with the chosen method."""


def check_irq(method: str, irq: int) -> None:
    if method == "spi" and not ARM_FIRST_SPI <= irq < ARM_GIC_MAX_IRQ:
        raise IrqRangeError(f"irq {irq} is not an Arm SPI ({ARM_FIRST_SPI}..{ARM_GIC_MAX_IRQ - 1})")
    if method == "isa" and not 0 <= irq <= ISA_IRQ_MAX:
        raise IrqRangeError(f"irq {irq} is not an ISA IRQ (0..{ISA_IRQ_MAX})")
    if method == "msi" and not MSI_VECTOR_MIN <= irq <= MSI_VECTOR_MAX:
        raise IrqRangeError(f"irq {irq} is not an MSI vector ({MSI_VECTOR_MIN}..{MSI_VECTOR_MAX})")


class XenInterruptLine:
    """One guest interrupt; counts raises and failures in the adaptor's counters."""

    def __init__(self, dm: DeviceModel, method: str, irq: int, counters: dict[str, int],
                 log: Any) -> None:
        check_irq(method, irq)
        self.dm = dm
        self.method = method
        self.irq = irq
        self.counters = counters
        self.log = log
        self.eventfd: int | None = None  # set when IRQFD carries this line
        self.raised = 0

    def raise_(self) -> None:
        self.raised += 1
        try:
            if self.eventfd is not None:
                os.eventfd_write(self.eventfd, 1)
            elif self.method == "spi":
                self.dm.set_irq_level(self.irq, 1)
            elif self.method == "isa":
                self.dm.set_isa_irq_level(self.irq, 1)
                self.dm.set_isa_irq_level(self.irq, 0)
            else:
                self.dm.inject_msi(MSI_ADDRESS_BASE, self.irq)
            self.counters["interrupts"] = self.counters.get("interrupts", 0) + 1
        except OSError as exc:
            n = self.counters.get("interrupt_errors", 0) + 1
            self.counters["interrupt_errors"] = n
            if n == 1 or n % 1000 == 0:  # a dead domain fails every call: do not flood
                self.log.warning("xen_interrupt_failed", irq=self.irq, method=self.method,
                                 error=str(exc), count=n)

    def lower(self) -> None:
        return None  # edges and MSIs have nothing to lower


class Privcmd:
    """Our own /dev/xen/privcmd handle, for the eventfd ioctls the libraries do not wrap."""

    def __init__(self, domid: int, path: str = "/dev/xen/privcmd") -> None:
        self.domid = domid
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        # Restrict it to the guest at once: xentoolcore_restrict_all only knows library handles.
        try:
            fcntl.ioctl(self.fd, IOCTL_PRIVCMD_RESTRICT, ctypes.c_uint16(domid))
        except OSError:
            os.close(self.fd)
            raise
        self._keep: list[Any] = []

    def irqfd(self, spi: int) -> int:
        """An eventfd that raises Arm SPI `spi` (one edge) each time it is written."""
        op = XenDmOp()
        op.op = XEN_DMOP_SET_IRQ_LEVEL
        op.u.set_irq_level.irq = spi
        op.u.set_irq_level.level = 1
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        arg = PrivcmdIrqfd(dm_op=ctypes.addressof(op), size=ctypes.sizeof(op), fd=efd, flags=0,
                           dom=self.domid)
        try:
            fcntl.ioctl(self.fd, IOCTL_PRIVCMD_IRQFD, arg)
        except OSError:
            os.close(efd)
            raise
        self._keep.append((op, efd, "irqfd", spi))
        return efd

    def ioeventfd(self, page_addr: int, ports: list[int], window_base: int, vq: int) -> int:
        """An eventfd the kernel signals (answering the access itself) when the guest writes
        `vq` to the QueueNotify register of the window at `window_base`."""
        port_arr = (ctypes.c_uint32 * len(ports))(*ports)
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        arg = PrivcmdIoeventfd(ioreq=page_addr, ports=ctypes.addressof(port_arr),
                               addr=window_base, addr_len=4, event_fd=efd, vcpus=len(ports),
                               vq=vq, flags=0, dom=self.domid)
        try:
            fcntl.ioctl(self.fd, IOCTL_PRIVCMD_IOEVENTFD, arg)
        except OSError:
            os.close(efd)
            raise
        self._keep.append((port_arr, efd, "ioeventfd", (page_addr, window_base, vq)))
        return efd

    def close(self) -> None:
        for obj, efd, kind, what in self._keep:
            try:
                if kind == "irqfd":
                    arg: Any = PrivcmdIrqfd(dm_op=ctypes.addressof(obj),
                                            size=ctypes.sizeof(obj), fd=efd,
                                            flags=PRIVCMD_IRQFD_FLAG_DEASSIGN, dom=self.domid)
                    fcntl.ioctl(self.fd, IOCTL_PRIVCMD_IRQFD, arg)
                else:
                    page_addr, window_base, vq = what
                    arg = PrivcmdIoeventfd(ioreq=page_addr, ports=ctypes.addressof(obj),
                                           addr=window_base, addr_len=4, event_fd=efd,
                                           vcpus=len(obj), vq=vq,
                                           flags=PRIVCMD_IOEVENTFD_FLAG_DEASSIGN,
                                           dom=self.domid)
                    fcntl.ioctl(self.fd, IOCTL_PRIVCMD_IOEVENTFD, arg)
            except OSError:
                pass  # the domain is gone, or the kernel already dropped it
            os.close(efd)
        self._keep.clear()
        os.close(self.fd)
