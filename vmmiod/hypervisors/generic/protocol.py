"""Wire protocol of the hypervisor-agnostic IOREQ channel (docs/generic-ioreq.md).

Sans-IO: this module packs and parses messages and checks every rule a peer's hello must meet
that does not need the kernel (counts, ranges, overlaps). The adaptor does the socket work and
the checks that do (fd types, fd sizes, mapping). Both ends use it: the daemon's adaptor and the
simulated guest's VMM side (vmmiod/sim/vmm.py).

Transport: one AF_UNIX SOCK_SEQPACKET connection per VMM; every message is one packet that
starts with the 8-byte header `MAGIC, u16 version, u16 type`; all integers little-endian.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

MAGIC = b"VMIO"
VERSION = 1  # the only version this code speaks; a hello with another is refused
HEADER = struct.Struct("<4sHH")  # magic, version, type

# Message types.
MSG_SERVER_HELLO = 1  # daemon -> VMM, at once on accept
MSG_CLIENT_HELLO = 2  # VMM -> daemon, with SCM_RIGHTS
MSG_ACCEPT = 3  # daemon -> VMM: serving from now on
MSG_REFUSE = 4  # daemon -> VMM: u16 reason + UTF-8 text; the daemon then closes
MSG_IRQ_LEVEL = 5  # daemon -> VMM: level of a line whose mode is LEVEL
MSG_BYE = 6  # VMM -> daemon: orderly disconnect (EOF means the same)

SERVER_HELLO = struct.Struct("<HHHH")  # max_vcpus, n_windows, flags, reserved
WINDOW = struct.Struct("<QII")  # base, size, irq
CLIENT_HELLO = struct.Struct("<HHHH")  # n_vcpus, n_regions, n_irqs, flags
REGION = struct.Struct("<QQQII")  # gpa, size, fd offset, flags, reserved
IRQ = struct.Struct("<II")  # irq, mode
REFUSE = struct.Struct("<H")  # reason
IRQ_LEVEL = struct.Struct("<II")  # irq, level

SERVER_F_LEVEL_IRQ = 1 << 0  # the daemon can send MSG_IRQ_LEVEL
REGION_F_READONLY = 1 << 0  # guest ROM: the daemon maps it read-only
IRQ_MODE_EVENTFD = 0  # one eventfd per line; raise_ writes 1 (an edge), lower does nothing
IRQ_MODE_LEVEL = 1  # no fd; the daemon sends MSG_IRQ_LEVEL on every change of the line

PAGE_SIZE = 4096
IOREQ_SIZE = 32  # Xen's ioreq_t
IOREQ_PAGE_SIZE = PAGE_SIZE  # the ioreq page fd must be exactly one page
MAX_VCPUS = IOREQ_PAGE_SIZE // IOREQ_SIZE  # 128, as with Xen
MAX_REGIONS = 64
MAX_IRQS = 256
MAX_MESSAGE = HEADER.size + CLIENT_HELLO.size + MAX_REGIONS * REGION.size + MAX_IRQS * IRQ.size
MAX_FDS = MAX_REGIONS + 1 + 2 * MAX_VCPUS + MAX_IRQS
ADDR_LIMIT = 1 << 64

# Refusal reasons (the text says the details).
REFUSE_MALFORMED = 1  # not a hello, bad magic, truncated, trailing bytes
REFUSE_VERSION = 2  # unsupported protocol version
REFUSE_FD_COUNT = 3  # number of fds does not match the hello
REFUSE_BAD_FD = 4  # an fd of the wrong kind (not an eventfd, not mappable)
REFUSE_REGIONS = 5  # regions empty, misaligned, overlapping, or unmappable
REFUSE_PAGE = 6  # ioreq page of the wrong size
REFUSE_VCPUS = 7  # vCPU count out of range
REFUSE_IRQS = 8  # interrupt lines missing, duplicated or of an unknown mode
REFUSE_BUSY = 9  # another VMM is connected


class ProtocolError(Exception):
    """A peer broke the protocol; `reason` is one of REFUSE_*."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Window:
    """One virtio-mmio window the daemon serves: the VMM routes accesses to it as IOREQs."""

    base: int
    size: int
    irq: int


@dataclass(frozen=True)
class RegionSpec:
    gpa: int
    size: int
    offset: int = 0
    readonly: bool = False

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class IrqSpec:
    irq: int
    mode: int = IRQ_MODE_EVENTFD


@dataclass(frozen=True)
class ClientHello:
    version: int
    n_vcpus: int
    regions: tuple[RegionSpec, ...]
    irqs: tuple[IrqSpec, ...]
    flags: int = 0

    def fd_count(self) -> int:
        """Regions, the ioreq page, two eventfds per vCPU, one per EVENTFD-mode line."""
        lines = sum(1 for i in self.irqs if i.mode == IRQ_MODE_EVENTFD)
        return len(self.regions) + 1 + 2 * self.n_vcpus + lines


@dataclass(frozen=True)
class ServerHello:
    version: int
    max_vcpus: int
    windows: tuple[Window, ...]
    flags: int = 0


# -- packing ---------------------------------------------------------------------------------------
def header(msg_type: int, version: int = VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, msg_type)


def pack_server_hello(windows: list[Window] | tuple[Window, ...],
                      flags: int = SERVER_F_LEVEL_IRQ) -> bytes:
    body = SERVER_HELLO.pack(MAX_VCPUS, len(windows), flags, 0)
    return header(MSG_SERVER_HELLO) + body + b"".join(
        WINDOW.pack(w.base, w.size, w.irq) for w in windows)


def pack_client_hello(hello: ClientHello) -> bytes:
    out = [header(MSG_CLIENT_HELLO, hello.version),
           CLIENT_HELLO.pack(hello.n_vcpus, len(hello.regions), len(hello.irqs), hello.flags)]
    for r in hello.regions:
        out.append(REGION.pack(r.gpa, r.size, r.offset, REGION_F_READONLY if r.readonly else 0, 0))
    for i in hello.irqs:
        out.append(IRQ.pack(i.irq, i.mode))
    return b"".join(out)


def pack_refuse(reason: int, message: str) -> bytes:
    return header(MSG_REFUSE) + REFUSE.pack(reason) + message.encode("utf-8", "replace")[:1024]


def pack_irq_level(irq: int, level: int) -> bytes:
    return header(MSG_IRQ_LEVEL) + IRQ_LEVEL.pack(irq, 1 if level else 0)


# -- parsing ---------------------------------------------------------------------------------------
def parse_header(data: bytes) -> tuple[int, int]:
    """(version, type) of a message, or ProtocolError(REFUSE_MALFORMED)."""
    if len(data) < HEADER.size:
        raise ProtocolError(REFUSE_MALFORMED, f"message of {len(data)} bytes is too short")
    magic, version, msg_type = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(REFUSE_MALFORMED, f"bad magic {magic!r} (expected {MAGIC!r})")
    return version, msg_type


def parse_server_hello(data: bytes) -> ServerHello:
    version, msg_type = parse_header(data)
    if msg_type != MSG_SERVER_HELLO:
        raise ProtocolError(REFUSE_MALFORMED, f"expected a server hello, got type {msg_type}")
    off = HEADER.size
    if len(data) < off + SERVER_HELLO.size:
        raise ProtocolError(REFUSE_MALFORMED, "server hello truncated")
    max_vcpus, n_windows, flags, _ = SERVER_HELLO.unpack_from(data, off)
    off += SERVER_HELLO.size
    if len(data) != off + n_windows * WINDOW.size:
        raise ProtocolError(REFUSE_MALFORMED, "server hello length does not match its windows")
    windows = tuple(Window(*WINDOW.unpack_from(data, off + k * WINDOW.size))
                    for k in range(n_windows))
    return ServerHello(version, max_vcpus, windows, flags)


def parse_refuse(data: bytes) -> tuple[int, str]:
    off = HEADER.size
    if len(data) < off + REFUSE.size:
        return REFUSE_MALFORMED, "refused (no reason given)"
    (reason,) = REFUSE.unpack_from(data, off)
    return reason, data[off + REFUSE.size:].decode("utf-8", "replace")


def parse_client_hello(data: bytes) -> ClientHello:
    """Parse and check a client hello (everything that needs no fd). Raises ProtocolError."""
    version, msg_type = parse_header(data)
    if msg_type != MSG_CLIENT_HELLO:
        raise ProtocolError(REFUSE_MALFORMED, f"expected a client hello, got type {msg_type}")
    if version != VERSION:
        raise ProtocolError(REFUSE_VERSION,
                            f"protocol version {version} is not supported (this daemon: {VERSION})")
    off = HEADER.size
    if len(data) < off + CLIENT_HELLO.size:
        raise ProtocolError(REFUSE_MALFORMED, "client hello truncated")
    n_vcpus, n_regions, n_irqs, flags = CLIENT_HELLO.unpack_from(data, off)
    off += CLIENT_HELLO.size
    want = off + n_regions * REGION.size + n_irqs * IRQ.size
    if len(data) != want:
        raise ProtocolError(REFUSE_MALFORMED,
                            f"client hello is {len(data)} bytes, its counts say {want}")
    if not 1 <= n_vcpus <= MAX_VCPUS:
        raise ProtocolError(REFUSE_VCPUS, f"{n_vcpus} vCPUs: must be 1..{MAX_VCPUS}")
    if not 1 <= n_regions <= MAX_REGIONS:
        raise ProtocolError(REFUSE_REGIONS, f"{n_regions} memory regions: must be 1..{MAX_REGIONS}")
    if n_irqs > MAX_IRQS:
        raise ProtocolError(REFUSE_IRQS, f"{n_irqs} interrupt lines: at most {MAX_IRQS}")
    regions = []
    for k in range(n_regions):
        gpa, size, fd_off, rflags, _ = REGION.unpack_from(data, off + k * REGION.size)
        regions.append(RegionSpec(gpa, size, fd_off, bool(rflags & REGION_F_READONLY)))
    off += n_regions * REGION.size
    irqs = tuple(IrqSpec(*IRQ.unpack_from(data, off + k * IRQ.size)) for k in range(n_irqs))
    hello = ClientHello(version, n_vcpus, tuple(regions), irqs, flags)
    check_regions(hello.regions)
    check_irqs(hello.irqs)
    return hello


def check_regions(regions: tuple[RegionSpec, ...]) -> None:
    """Page-aligned, non-empty, no wrap past 2**64, no two overlapping."""
    for r in regions:
        if r.size == 0 or r.gpa % PAGE_SIZE or r.size % PAGE_SIZE or r.offset % PAGE_SIZE:
            raise ProtocolError(REFUSE_REGIONS,
                                f"region {r.gpa:#x}+{r.size:#x} (fd offset {r.offset:#x}) "
                                f"is empty or not page-aligned")
        if r.end > ADDR_LIMIT or r.offset + r.size > ADDR_LIMIT >> 1:
            raise ProtocolError(REFUSE_REGIONS, f"region {r.gpa:#x}+{r.size:#x} wraps")
    ordered = sorted(regions, key=lambda r: r.gpa)
    for a, b in itertools.pairwise(ordered):
        if b.gpa < a.end:
            raise ProtocolError(REFUSE_REGIONS, f"regions {a.gpa:#x}+{a.size:#x} and "
                                                f"{b.gpa:#x}+{b.size:#x} overlap")


def check_irqs(irqs: tuple[IrqSpec, ...]) -> None:
    seen: set[int] = set()
    for i in irqs:
        if i.mode not in (IRQ_MODE_EVENTFD, IRQ_MODE_LEVEL):
            raise ProtocolError(REFUSE_IRQS, f"irq {i.irq}: unknown mode {i.mode}")
        if i.irq in seen:
            raise ProtocolError(REFUSE_IRQS, f"irq {i.irq} is given twice")
        seen.add(i.irq)
