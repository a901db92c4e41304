"""What every hypervisor adaptor provides to the daemon.

An adaptor receives IOREQs, turns each into an `IoRequest`, dispatches it on the `MmioBus` and
completes it; it provides guest memory (attached to the bus, which hands it to each window) and
one `InterruptLine` per IRQ. It never imports a device module: what it shares with them is in
vmmiod/transport.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from vmmiod.transport import InterruptLine


class PlatformUnavailable(Exception):
    """The platform is missing a piece (library, device node, hypervisor feature).

    The message says what is missing and how to get it; the daemon exits with EX_UNAVAILABLE.
    """

    exit_code = 69


class GuestGone(Exception):
    """The guest went away before serving started (a Xen domain destroyed while its instance
    waited for the toolstack's entries). Nothing is wrong and nothing is left to serve: the
    daemon ends with `exit_code` 0, as it does when a served guest goes away."""

    exit_code = 0


class Adaptor:
    """Base class of the Xen and generic adaptors."""

    kind = "base"

    def __init__(self, bus: Any, log: Any) -> None:
        self.bus = bus  # vmmiod.bus.MmioBus
        self.log = log
        # Resolved with an exit status when the guest is gone (Xen domain died, generic VMM gone
        # with on_disconnect: exit); the daemon then stops.
        self.finished: asyncio.Future[int] | None = None
        self.counters: dict[str, int] = {}
        # Set by the daemon (docs/restart.md): called with an identity of the guest (same guest
        # and connection -> same string) once its memory is on the bus and before any request
        # is served, so the windows can resume from the state record; with None when the guest
        # went away.
        self.on_guest: Callable[[str | None], None] | None = None
        # Set by the daemon before stop() when it stops for a restart: leave what the next
        # instance takes over (the Xen IOREQ server) in place.
        self.handover = False

    @property
    def access_platform(self) -> bool:
        """True when guest buffer addresses are not guest-physical (Xen grants)."""
        return False

    async def prepare(self) -> None:
        """Before devices are built: resolve the guest, open handles (may raise PlatformUnavailable)."""

    def interrupt_line(self, irq: int) -> InterruptLine:
        raise NotImplementedError

    def windows(self) -> list[tuple[str, int, int]]:
        """(device id, base, irq) the adaptor discovered for `mmio: auto` devices (Xen xenstore)."""
        return []

    async def start(self) -> None:
        """Every window is on the bus: start serving IOREQs."""
        raise NotImplementedError

    def quiesce(self) -> None:
        """Stopping for a restart: take no more requests (they wait for the next instance)."""

    async def stop(self) -> None:
        """Orderly teardown: stop serving, release handles and mappings."""

    def stats(self) -> dict[str, int]:
        return dict(self.counters)
