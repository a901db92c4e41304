"""The vhost-user wire format (QEMU docs/interop/vhost-user.rst): header, payloads, replies.

Sans-IO: bytes in, named values out, and every length checked. A message is a 12-byte header
(u32 request, u32 flags, u32 size) followed by `size` bytes of payload, in the host's byte order
(both ends run on one host; vmmiod runs on little-endian hosts only, see vmmiod/memory.py). File
descriptors travel in SCM_RIGHTS next to the header. A malformed payload raises `MessageError`
with a stable `reason`; the adaptor logs it and closes the connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- header ----------------------------------------------------------------------------------
HEADER = struct.Struct("<III")  # request, flags, size
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_PAYLOAD = 4096  # the largest payload defined is a config space access (12 + 256 bytes)
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: SET_MEM_TABLE carries the most

# -- front-end requests (ids from the spec) ----------------------------------------------------
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25
GET_INFLIGHT_FD = 31
SET_INFLIGHT_FD = 32
RESET_DEVICE = 34
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38

REQUEST_NAMES = {v: k for k, v in globals().items()
                 if k.isupper() and isinstance(v, int) and k.startswith(("GET_", "SET_", "RESET_",
                                                                         "ADD_", "REM_"))}

# -- feature bits ----------------------------------------------------------------------------
F_PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES, in the virtio feature word
F_LOG_ALL = 26  # VHOST_F_LOG_ALL (migration dirty log); never offered

PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_INFLIGHT_SHMFD = 12
PROTOCOL_F_RESET_DEVICE = 13
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
PROTOCOL_FEATURES = sum(1 << b for b in (PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK, PROTOCOL_F_CONFIG,
                                         PROTOCOL_F_INFLIGHT_SHMFD, PROTOCOL_F_RESET_DEVICE,
                                         PROTOCOL_F_CONFIGURE_MEM_SLOTS))

# -- payload layouts -------------------------------------------------------------------------
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")  # struct vhost_vring_state: index, num
ADDR = struct.Struct("<IIQQQQ")  # struct vhost_vring_addr: index, flags, desc, used, avail, log
REGION = struct.Struct("<QQQQ")  # guest address, size, user address, mmap offset
MEMORY_HEAD = struct.Struct("<II")  # num regions, padding
MEM_REG = struct.Struct("<QQQQQ")  # padding, then one region
CONFIG_HEAD = struct.Struct("<III")  # offset, size, flags
INFLIGHT = struct.Struct("<QQHH4x")  # mmap size, mmap offset, num queues, queue size (C size 24)
INFLIGHT_PACKED_SIZE = 20  # the same fields without the trailing padding of the C struct

VRING_IDX_MASK = 0xFF  # kick/call/err u64: bits 0-7 the ring index
VRING_NOFD = 0x100  # bit 8: no fd in the ancillary data (polling)
VRING_F_LOG = 0x1  # vhost_vring_addr.flags: log used-ring writes (migration); refused
MAX_CONFIG_SIZE = 256  # VHOST_USER_MAX_CONFIG_SIZE
CONFIG_F_MIGRATION = 0x1


class MessageError(Exception):
    """The message breaks the protocol; `reason` is a stable snake_case name for the logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return REQUEST_NAMES.get(self.request, f"unknown({self.request})")


@dataclass(frozen=True, slots=True)
class MemRegion:
    gpa: int
    size: int
    uva: int  # the front-end's user address of the region (ring addresses are these)
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True, slots=True)
class ConfigAccess:
    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Inflight:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


def parse_header(data: bytes) -> Header:
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise MessageError("bad_version", f"header version {flags & VERSION_MASK}, expected 1")
    if flags & FLAG_REPLY:
        raise MessageError("reply_from_front_end", "the front-end sent a message flagged reply")
    if size > MAX_PAYLOAD:
        raise MessageError("payload_too_large", f"payload of {size} bytes (at most "
                                                f"{MAX_PAYLOAD})")
    return Header(request, flags, size)


def _need(name: str, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise MessageError("bad_size", f"{name}: payload of {len(payload)} bytes, "
                                       f"expected {size}")


def parse_u64(name: str, payload: bytes) -> int:
    _need(name, payload, U64.size)
    value: int = U64.unpack(payload)[0]
    return value


def parse_state(name: str, payload: bytes) -> tuple[int, int]:
    _need(name, payload, STATE.size)
    index, num = STATE.unpack(payload)
    return index, num


def parse_addr(payload: bytes) -> VringAddr:
    _need("SET_VRING_ADDR", payload, ADDR.size)
    return VringAddr(*ADDR.unpack(payload))


def parse_memory(payload: bytes) -> list[MemRegion]:
    if len(payload) < MEMORY_HEAD.size:
        raise MessageError("bad_size", f"SET_MEM_TABLE: payload of {len(payload)} bytes")
    n, _ = MEMORY_HEAD.unpack_from(payload)
    if not 1 <= n <= MAX_FDS:
        raise MessageError("bad_region_count", f"SET_MEM_TABLE: {n} regions (1 to {MAX_FDS})")
    _need("SET_MEM_TABLE", payload, MEMORY_HEAD.size + n * REGION.size)
    return [MemRegion(*REGION.unpack_from(payload, MEMORY_HEAD.size + k * REGION.size))
            for k in range(n)]


def parse_mem_reg(name: str, payload: bytes) -> MemRegion:
    _need(name, payload, MEM_REG.size)
    return MemRegion(*MEM_REG.unpack(payload)[1:])


def parse_config(name: str, payload: bytes, *, with_data: bool) -> ConfigAccess:
    if len(payload) < CONFIG_HEAD.size:
        raise MessageError("bad_size", f"{name}: payload of {len(payload)} bytes")
    offset, size, flags = CONFIG_HEAD.unpack_from(payload)
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE - size:
        raise MessageError("bad_config_range", f"{name}: offset {offset} size {size} outside "
                                               f"the {MAX_CONFIG_SIZE}-byte config space")
    _need(name, payload, CONFIG_HEAD.size + size)
    data = bytes(payload[CONFIG_HEAD.size:]) if with_data else b""
    return ConfigAccess(offset, size, flags, data)


def parse_inflight(name: str, payload: bytes) -> Inflight:
    if len(payload) not in (INFLIGHT.size, INFLIGHT_PACKED_SIZE):
        raise MessageError("bad_size", f"{name}: payload of {len(payload)} bytes, expected "
                                       f"{INFLIGHT.size}")
    return Inflight(*INFLIGHT.unpack(bytes(payload).ljust(INFLIGHT.size, b"\0")))


# -- replies ---------------------------------------------------------------------------------
def reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def reply_u64(request: int, value: int) -> bytes:
    return reply(request, U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF))


def reply_state(request: int, index: int, num: int) -> bytes:
    return reply(request, STATE.pack(index, num))


def reply_config(request: int, access: ConfigAccess, data: bytes) -> bytes:
    """GET_CONFIG's answer; `data` empty means failure (a zero-size payload, per the spec)."""
    if not data:
        return reply(request, CONFIG_HEAD.pack(access.offset, 0, access.flags))
    return reply(request, CONFIG_HEAD.pack(access.offset, len(data), access.flags) + data)


def reply_inflight(request: int, info: Inflight) -> bytes:
    return reply(request, INFLIGHT.pack(info.mmap_size, info.mmap_offset, info.num_queues,
                                        info.queue_size))


# -- the front-end side (test peers, tools) ---------------------------------------------------
def request(req: int, payload: bytes = b"", need_reply: bool = False) -> bytes:
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(req, flags, len(payload)) + payload


def pack_memory(regions: list[MemRegion]) -> bytes:
    return MEMORY_HEAD.pack(len(regions), 0) + b"".join(
        REGION.pack(r.gpa, r.size, r.uva, r.mmap_offset) for r in regions)


def pack_mem_reg(region: MemRegion) -> bytes:
    return MEM_REG.pack(0, region.gpa, region.size, region.uva, region.mmap_offset)


def pack_addr(a: VringAddr) -> bytes:
    return ADDR.pack(a.index, a.flags, a.desc, a.used, a.avail, a.log)


def pack_config(offset: int, size: int, flags: int = 0, data: bytes = b"") -> bytes:
    return CONFIG_HEAD.pack(offset, size, flags) + (data or bytes(size))


def pack_inflight(info: Inflight) -> bytes:
    return INFLIGHT.pack(info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size)
