"""One port of the virtio-console device (VIRTIO 1.2, 5.3): its queues, its backend (a pty, a
Unix socket or a file) and the guest's view of it. The device is vmmiod/devices/console.py."""

from __future__ import annotations

from typing import Any, Protocol

from vmmiod.config import ConsolePortConfig
from vmmiod.config import FileBackend as FileBackendConfig
from vmmiod.config import PtyBackend as PtyBackendConfig
from vmmiod.config import SocketBackend as SocketBackendConfig
from vmmiod.devices.console_backends import Counters, FileBackend, PortBackend
from vmmiod.devices.console_pty import PtyBackend
from vmmiod.devices.console_socket import SocketBackend

# Queue indexes (5.3.2): receiveq/transmitq of port 0, the control queues (MULTIPORT), then a
# receiveq/transmitq pair per further port.
RECEIVEQ0 = 0
TRANSMITQ0 = 1
CONTROL_RECEIVEQ = 2
CONTROL_TRANSMITQ = 3



def receiveq_index(port: int) -> int:
    return RECEIVEQ0 if port == 0 else 2 + 2 * port


def transmitq_index(port: int) -> int:
    return TRANSMITQ0 if port == 0 else 3 + 2 * port


def port_of_queue(index: int) -> tuple[int, bool]:
    """(port, is_transmitq) of a data queue index (not a control queue)."""
    if index < 2:
        return 0, index == TRANSMITQ0
    return index // 2 - 1, bool(index & 1)


class PortOwner(Protocol):
    """What a port asks of its device when its backend has news."""

    counters: dict[str, int]

    def _run_queue(self, index: int) -> None: ...

    def schedule(self, index: int) -> None: ...

    def host_connection_changed(self, port: Port, connected: bool) -> None: ...

    def resize(self, cols: int, rows: int) -> None: ...


class Port:
    """One console port: its backend and the guest's view of it. Listens to the backend."""

    def __init__(self, device: PortOwner, index: int, cfg: ConsolePortConfig,
                 winsize: tuple[int, int], log: Any) -> None:
        self.device = device
        self.index = index
        self.cfg = cfg
        self.name = cfg.name
        self.count = Counters(device.counters, index)
        self.backend: PortBackend = make_backend(self, winsize, log)
        self.rxq = receiveq_index(index)
        self.txq = transmitq_index(index)
        self.guest_ready = False  # PORT_READY(1) seen (multiport)
        self.guest_open = False  # PORT_OPEN(1) seen (multiport)
        self.tx_pending: tuple[Any, int] | None = None  # (chain, bytes already written)

    def forget_guest(self) -> None:
        self.guest_ready = self.guest_open = False
        self.tx_pending = None
        self.backend.set_input(False)

    # PortListener
    def backend_readable(self) -> None:
        self.device._run_queue(self.rxq)

    def backend_writable(self) -> None:
        self.device.schedule(self.txq)

    def backend_connection(self, connected: bool) -> None:
        self.device.host_connection_changed(self, connected)

    def backend_resize(self, cols: int, rows: int) -> None:
        if self.index == 0:
            self.device.resize(cols, rows)


def make_backend(port: Port, winsize: tuple[int, int], log: Any) -> PortBackend:
    """The backend the port's configuration names; `winsize` is a pty's first (cols, rows)."""
    b = port.cfg.backend
    common = (port.index, port.cfg.buffer, port, port.count, log)
    if isinstance(b, PtyBackendConfig):
        return PtyBackend(b.link, winsize, *common)
    if isinstance(b, SocketBackendConfig):
        return SocketBackend(b.path, b.takeover, *common)
    if isinstance(b, FileBackendConfig):
        return FileBackend(b.path, *common)
    raise ValueError(f"console port {port.index}: unknown backend {b!r}")
