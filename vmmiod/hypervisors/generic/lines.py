"""The guest's interrupt lines as the generic channel drives them (docs/generic-ioreq.md,
"Interrupts"): an eventfd written per raise (an edge), or IRQ_LEVEL messages on the socket."""

from __future__ import annotations

import os
import socket

from vmmiod.hypervisors.generic.protocol import pack_irq_level

EVENTFD_ONE = (1).to_bytes(8, "little")


class GenericLine:
    """One guest interrupt line. A no-op while no VMM is connected (or the VMM gave no line)."""

    def __init__(self, irq: int, counters: dict[str, int]) -> None:
        self.irq = irq
        self.fd: int | None = None  # IRQ_MODE_EVENTFD: the VMM's eventfd
        self.sock: socket.socket | None = None  # IRQ_MODE_LEVEL: the connection
        self.level = False
        self._counters = counters

    def bind(self, fd: int | None, sock: socket.socket | None) -> None:
        self.fd, self.sock, self.level = fd, sock, False

    def raise_(self) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, EVENTFD_ONE)
                self._counters["interrupts"] += 1
            except OSError:  # counter at its maximum: the VMM does not read its eventfd
                self._counters["interrupts_dropped"] += 1
        elif self.sock is not None and not self.level:
            self._send_level(True)

    def lower(self) -> None:
        if self.sock is not None and self.level:
            self._send_level(False)

    def _send_level(self, level: bool) -> None:
        assert self.sock is not None
        try:
            self.sock.send(pack_irq_level(self.irq, level))
            self.level = level
            self._counters["interrupts"] += int(level)
        except OSError:  # the VMM does not read its socket; its EOF is handled elsewhere
            self._counters["interrupts_dropped"] += 1
