"""The daemon's serving half in a background thread of the test process (tests only).

`ThreadedDaemon` wires what vmmiod/daemon.py wires for one guest (an MmioBus, one VirtioMmio
window per device, a GenericAdaptor) on its own event loop in a thread, so a test can drive the
channel with the simulated guest in the main thread and look at device state afterwards. The
real daemon runs as `vmmiod run CONFIG` (see vmmiod/sim/harness.py for that).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Self, TypeVar

import structlog

from vmmiod.config import Config, GenericConfig, GuestConfig, LogConfig
from vmmiod.devices.base import VirtioDevice

T = TypeVar("T")


class ThreadedDaemon:
    """devices: (device, base, irq); the adaptor listens on `socket_path`."""

    def __init__(self, socket_path: Path, devices: list[tuple[VirtioDevice, int, int]], *,
                 on_disconnect: str = "wait", version: int = 2, log: Any = None) -> None:
        self.socket_path = Path(socket_path)
        self.specs = devices
        self.version = version
        self.log = log if log is not None else structlog.get_logger()
        self.config = Config(Path("/dev/null"), GuestConfig("sim"),
                             GenericConfig(socket=self.socket_path,
                                           on_disconnect=on_disconnect),  # type: ignore[arg-type]
                             LogConfig(), ())
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vmmiod-inproc",
                                        daemon=True)
        self.adaptor: Any = None
        self.bus: Any = None
        self.windows: list[Any] = []

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the daemon's loop and return its result (state is the loop's)."""
        async def run() -> T:
            return fn()
        return self.run(run())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> Self:
        from vmmiod.bus import MmioBus
        from vmmiod.hypervisors.generic import GenericAdaptor
        from vmmiod.mmio import VirtioMmio

        self._thread.start()

        async def up() -> None:
            self.bus = MmioBus(log=self.log)
            self.adaptor = GenericAdaptor(self.config, self.bus, self.log)
            await self.adaptor.prepare()
            for dev, base, irq in self.specs:
                await dev.open()
                window = VirtioMmio(dev, self.adaptor.interrupt_line(irq), version=self.version)
                self.bus.register(base, 0x200, window)
                self.windows.append(window)
            await self.adaptor.start()

        self.run(up())
        return self

    def stop(self) -> None:
        async def down() -> None:
            await self.adaptor.stop()
            for dev, _base, _irq in self.specs:
                await dev.close()

        try:
            if self.adaptor is not None:
                self.run(down())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
