"""The Xen adaptor's optional eventfd fast path (Linux >= 6.7, CONFIG_XEN_PRIVCMD_EVENTFD).

- IRQFD (Arm SPIs): the kernel runs a prepared set_irq_level dm_op whenever an eventfd is
  written, so `XenInterruptLine.raise_()` is one eventfd write instead of a dm_op ioctl.
- IOEVENTFD: the kernel answers a guest's QueueNotify write itself and signals an eventfd per
  queue; the write is replayed on the bus for the window.
A kernel without them (Debian 12's 6.1) leaves every line on its dm_op and every notify an IOREQ.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from vmmiod.hypervisors.xen.abi import VIRTIO_MMIO_QUEUE_NOTIFY
from vmmiod.hypervisors.xen.irq import Privcmd, XenInterruptLine
from vmmiod.hypervisors.xen.server import IoreqServer
from vmmiod.transport import queue_count


def open_fast_path(domid: int, privcmd_path: str, irq_method: str,
                   lines: dict[int, XenInterruptLine], bus: Any, server: IoreqServer,
                   loop: asyncio.AbstractEventLoop, counters: dict[str, int],
                   log: Any) -> Privcmd | None:
    """Set up what the kernel offers; the privcmd handle to close at stop, or None."""
    try:
        privcmd = Privcmd(domid, privcmd_path)
    except OSError:
        return None
    irqfds = 0
    if irq_method == "spi":
        for irq, line in lines.items():
            try:
                line.eventfd = privcmd.irqfd(irq)
                irqfds += 1
            except OSError:
                break  # the kernel has no IRQFD: every line keeps its dm_op
    ioeventfds = _ioeventfds(privcmd, bus, server, loop, counters)
    if irqfds or ioeventfds:
        log.info("xen_eventfd_fast_path", irqfds=irqfds, ioeventfds=ioeventfds)
        return privcmd
    privcmd.close()  # the kernel offers neither: nothing to keep the extra handle for
    return None


def _ioeventfds(privcmd: Privcmd, bus: Any, server: IoreqServer,
                loop: asyncio.AbstractEventLoop, counters: dict[str, int]) -> int:
    count = 0
    for base, _size, window in bus.windows():
        notify = base + VIRTIO_MMIO_QUEUE_NOTIFY
        for vq in range(queue_count(window)):
            try:
                # The kernel matches ioreq.addr against addr + QueueNotify: pass the base.
                efd = privcmd.ioeventfd(server.page_addr, server.ports, base, vq)
            except OSError:
                return count
            loop.add_reader(efd, _replay_notify, bus, counters, efd, notify, vq)
            count += 1
    return count


def _replay_notify(bus: Any, counters: dict[str, int], efd: int, notify: int, vq: int) -> None:
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        return
    # The kernel already answered the guest's write; replay it on the bus for the window.
    counters["ioeventfd_notifies"] = counters.get("ioeventfd_notifies", 0) + 1
    bus.access(notify, 4, True, vq)
