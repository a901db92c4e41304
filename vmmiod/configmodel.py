"""The configuration model: the frozen dataclasses the rest of vmmiod sees.

A leaf module (stdlib only), so the readers (vmmiod/configreader.py, vmmiod/configschema.py) can
build these without importing `vmmiod.config`, which sits on top of them with `load()`. Every
importer keeps writing `from vmmiod.config import X`: config.py re-exports each public name here
(a new class added here is added to its list too). See docs/configuration.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MMIO_WINDOW_SIZE = 0x200


@dataclass(frozen=True)
class GuestConfig:
    name: str
    domid: int | None = None  # None = "auto": resolve `name` through xenstore


@dataclass(frozen=True)
class XenConfig:
    kind: Literal["xen"] = "xen"
    # How guest interrupts are raised: "auto" (spi on arm64, isa on x86), "spi", "isa", "msi".
    interrupts: Literal["auto", "spi", "isa", "msi"] = "auto"
    grants: bool | Literal["auto"] = "auto"  # auto: follow xenstore grant_usage
    map_cache_pages: int = 16384  # foreign-mapping cache bound (4 KiB pages)
    domain_wait: float = 30.0  # seconds to wait for the domain to appear
    backend_domid: int = 0  # where the backend xenstore keys live (0 = dom0)
    # Not a YAML key: set by the dom0 service, whose instances start as soon as the domain is
    # introduced and must then wait for the toolstack's entry of every device, explicit ones too.
    require_entries: bool = False


GENERIC_RUN_DIR = Path("/run/vmmiod")
GENERIC_SOCKET_NAME = "vmm.sock"


@dataclass(frozen=True)
class GenericConfig:
    kind: Literal["generic"] = "generic"
    # The YAML's default is GENERIC_RUN_DIR/<guest name>/vmm.sock (the schema derives it).
    socket: Path = GENERIC_RUN_DIR / "guest" / GENERIC_SOCKET_NAME
    on_disconnect: Literal["wait", "exit"] = "wait"
    socket_mode: int = 0o600


@dataclass(frozen=True)
class VhostUserConfig:
    """vhost-user back-end: each device has its own socket (`vhost_user` in its section)."""

    kind: Literal["vhost-user"] = "vhost-user"
    socket_mode: int = 0o600  # mode of the sockets the daemon listens on
    reconnect: float = 1.0  # seconds between attempts of `connect: true` endpoints


HypervisorConfig = XenConfig | GenericConfig | VhostUserConfig


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    stats_interval: float = 60.0  # seconds between per-device counter records; 0 = off
    file: Path | None = None  # None: stderr (journald); a file is reopened on SIGHUP


@dataclass(frozen=True)
class MmioConfig:
    base: int | None  # None with auto=True: taken from xenstore by the Xen adaptor
    irq: int | None
    version: Literal[1, 2] = 2
    auto: bool = False


# vhost-user devices have no virtio-mmio window (the VMM owns the transport): their `mmio` is
# this placeholder and their `vhost_user` says where the socket is.
NO_WINDOW = MmioConfig(base=None, irq=None)


@dataclass(frozen=True)
class VhostUserSocket:
    path: Path
    connect: bool = False  # False: the daemon listens on `path`; True: it connects to it
    # Offer VHOST_USER_PROTOCOL_F_CONFIG (GET/SET_CONFIG); None: by device type (offers_config).
    config: bool | None = None

    def offers_config(self, dev_type: str) -> bool:
        """`config`, or by type when not given: not for net, whose front-ends (QEMU's virtio-net
        with -netdev vhost-user, cloud-hypervisor's) keep the config space themselves."""
        return self.config if self.config is not None else dev_type != "net"


@dataclass(frozen=True)
class BlockConfig:
    id: str
    mmio: MmioConfig
    path: Path
    readonly: bool = False
    cache: Literal["writeback", "writethrough", "none"] = "writeback"
    serial: str | None = None  # None: derived from guest name and device id
    queues: int = 1
    queue_size: int = 256
    lock: bool = True
    vhost_user: VhostUserSocket | None = None
    io_engine: Literal["auto", "io_uring", "threads", "sync"] = "auto"
    io_poll_us: int = 50  # io_uring: the bound of a completion poll (blockio/poll.py); 0: off
    type: Literal["block"] = "block"


@dataclass(frozen=True)
class SocketAddress:
    """An endpoint of the dgram net backend: UDP (host, port) or a Unix datagram path."""

    family: Literal["udp", "unix"]
    host: str = ""
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        """As written in the config: `udp:127.0.0.1:5555`, `udp:[::1]:5555`, `unix:PATH`."""
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"udp:[{self.host}]:{self.port}" if ":" in self.host else \
            f"udp:{self.host}:{self.port}"


@dataclass(frozen=True)
class TapBackend:
    kind: Literal["tap"] = "tap"
    ifname: str | None = None  # None: derived from guest and device id (<= 15 chars)
    bridge: str | None = None
    create: bool = True  # False: the interface must exist already


@dataclass(frozen=True)
class DgramBackend:
    kind: Literal["dgram"] = "dgram"
    local: SocketAddress = field(default_factory=lambda: SocketAddress("udp", "127.0.0.1", 0))
    remote: SocketAddress | None = None


NetBackend = TapBackend | DgramBackend


@dataclass(frozen=True)
class NetConfig:
    id: str
    mmio: MmioConfig
    backend: NetBackend
    mac: str | None = None  # "52:54:00:..."; None: stable locally administered default
    mtu: int = 1500
    queue_size: int = 256
    vhost_user: VhostUserSocket | None = None
    type: Literal["net"] = "net"


@dataclass(frozen=True)
class PtyBackend:
    kind: Literal["pty"] = "pty"
    link: Path | None = None  # stable symlink to the pty's path


@dataclass(frozen=True)
class SocketBackend:
    kind: Literal["socket"] = "socket"
    path: Path = Path("/run/vmmiod/console.sock")
    takeover: bool = False


@dataclass(frozen=True)
class FileBackend:
    kind: Literal["file"] = "file"
    path: Path = Path("/var/log/vmmiod/console.log")


ConsoleBackend = PtyBackend | SocketBackend | FileBackend


@dataclass(frozen=True)
class ConsolePortConfig:
    name: str  # port 0 is the console (/dev/hvc0); others appear as /dev/vport*p* with this name
    backend: ConsoleBackend
    buffer: int = 65536  # bytes kept while no client is attached


@dataclass(frozen=True)
class ConsoleConfig:
    id: str
    mmio: MmioConfig
    ports: tuple[ConsolePortConfig, ...]
    multiport: bool = False  # forced on when there is more than one port
    cols: int = 80
    rows: int = 25
    queue_size: int = 64
    vhost_user: VhostUserSocket | None = None
    type: Literal["console"] = "console"


DeviceConfig = BlockConfig | NetConfig | ConsoleConfig


@dataclass(frozen=True)
class Config:
    path: Path
    guest: GuestConfig
    hypervisor: HypervisorConfig
    log: LogConfig
    devices: tuple[DeviceConfig, ...]
