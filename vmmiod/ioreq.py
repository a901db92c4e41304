"""IOREQs: the neutral request, the Xen ioreq_t and KVM ioregionfd codecs, the slot server.

Every hypervisor adaptor turns what it receives into an `IoRequest` (or, on the hot path, into
the same four fields passed straight to `MmioBus.access`). Two wire formats live here:

- Xen's 32-byte `ioreq_t` (xen/include/public/hvm/ioreq.h), used by the Xen adaptor and by the
  generic channel, which shares the same page layout. `serve_ioreq_slot()` is the device-model
  side of its READY -> INPROCESS -> IORESP_READY handshake.
- The 32-byte command/response pair of KVM's proposed ioregionfd.

Nothing here knows devices or registers; values from the page are untrusted and never used as
anything but numbers handed to the bus.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from vmmiod import barrier

if TYPE_CHECKING:
    import mmap

    from vmmiod.bus import MmioBus

Buffer = Union[bytes, bytearray, memoryview, "mmap.mmap"]
WritableBuffer = Union[bytearray, memoryview, "mmap.mmap"]

# -- Xen ioreq_t -----------------------------------------------------------------------------------
# addr, data, count, size, vp_eport, _pad0, {state:4, data_is_ptr:1, dir:1, df:1, _pad1:1}, type
IOREQ_T = struct.Struct("<QQIIIHBB")
IOREQ_SIZE = 32
assert IOREQ_T.size == IOREQ_SIZE
MAX_VCPUS_PER_PAGE = 4096 // IOREQ_SIZE  # Xen caps HVM guests at 128 vCPUs; the page holds 128

# Byte offsets inside one slot, for the stores the handshake makes in place.
SLOT_DATA_OFFSET = 8
SLOT_FLAGS_OFFSET = 30

# ioreq_t.state (STATE_IOREQ_*)
STATE_IOREQ_NONE = 0
STATE_IOREQ_READY = 1
STATE_IOREQ_INPROCESS = 2
STATE_IORESP_READY = 3

# ioreq_t.type (IOREQ_TYPE_*)
IOREQ_TYPE_PIO = 0
IOREQ_TYPE_COPY = 1  # MMIO
IOREQ_TYPE_PCI_CONFIG = 2
IOREQ_TYPE_TIMEOFFSET = 7
IOREQ_TYPE_INVALIDATE = 8

# ioreq_t.dir
IOREQ_WRITE = 0
IOREQ_READ = 1

# Bitfields of the flags byte (offset 30): GCC on x86-64 and arm64 allocates from bit 0 up.
STATE_MASK = 0x0F
DATA_IS_PTR_BIT = 0x10
DIR_BIT = 0x20
DF_BIT = 0x40

U64 = struct.Struct("<Q")
_SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
ALL_ONES = 0xFFFF_FFFF_FFFF_FFFF


def size_mask(size: int) -> int:
    """The value mask of an access of `size` bytes (sizes above 8 are clamped to 8)."""
    m = _SIZE_MASK.get(size)
    if m is None:
        m = (1 << (8 * min(max(size, 0), 8))) - 1
    return m


@dataclass(slots=True)
class IoRequest:
    """One guest access, hypervisor-neutral. `data` is the write value, or the read result."""

    addr: int
    size: int
    is_write: bool
    data: int = 0
    type: int = IOREQ_TYPE_COPY
    count: int = 1
    data_is_ptr: bool = False
    df: bool = False


@dataclass(slots=True)
class XenIoreq:
    """Every field of one ioreq_t, bitfields unpacked."""

    addr: int = 0
    data: int = 0
    count: int = 1
    size: int = 4
    vp_eport: int = 0
    state: int = STATE_IOREQ_NONE
    data_is_ptr: bool = False
    dir: int = IOREQ_WRITE
    df: bool = False
    type: int = IOREQ_TYPE_COPY

    def to_request(self) -> IoRequest:
        return IoRequest(self.addr, self.size, self.dir == IOREQ_WRITE, self.data, self.type,
                         self.count, self.data_is_ptr, self.df)


def _flags(state: int, data_is_ptr: bool, dir_: int, df: bool) -> int:
    return ((state & STATE_MASK) | (DATA_IS_PTR_BIT if data_is_ptr else 0)
            | (DIR_BIT if dir_ else 0) | (DF_BIT if df else 0))


def decode_ioreq(buf: Buffer, offset: int = 0) -> XenIoreq:
    """Unpack the ioreq_t at `offset` (the reserved bits are ignored)."""
    addr, data, count, size, eport, _pad, flags, typ = IOREQ_T.unpack_from(buf, offset)
    return XenIoreq(addr, data, count, size, eport, flags & STATE_MASK,
                    bool(flags & DATA_IS_PTR_BIT), 1 if flags & DIR_BIT else 0,
                    bool(flags & DF_BIT), typ)


def pack_ioreq_into(buf: WritableBuffer, offset: int, req: XenIoreq) -> None:
    IOREQ_T.pack_into(buf, offset, req.addr & ALL_ONES, req.data & ALL_ONES,
                      req.count & 0xFFFF_FFFF, req.size & 0xFFFF_FFFF,
                      req.vp_eport & 0xFFFF_FFFF, 0,
                      _flags(req.state, req.data_is_ptr, req.dir, req.df), req.type & 0xFF)


def encode_ioreq(req: XenIoreq) -> bytes:
    out = bytearray(IOREQ_SIZE)
    pack_ioreq_into(out, 0, req)
    return bytes(out)


# -- the device-model side of the handshake --------------------------------------------------------

_unpack_slot = IOREQ_T.unpack_from
_pack_u64 = U64.pack_into


def serve_ioreq_slot(page: WritableBuffer, vcpu: int, bus: MmioBus) -> bool:
    """Answer vCPU `vcpu`'s pending ioreq_t on `page`, if it has one. True: notify the vCPU.

    The order is Xen's (see shared/reference/xen-ioreq.md, "Handshake"): proceed only on READY;
    read barrier before reading the request; INPROCESS; work; for reads store `data`; write
    barrier so Xen sees the data before the state; IORESP_READY. State NONE and vp_eport belong
    to Xen and are never written: moving the state backwards crashes the guest.
    """
    base = vcpu * IOREQ_SIZE
    flags_at = base + SLOT_FLAGS_OFFSET
    flags = page[flags_at]
    if flags & STATE_MASK != STATE_IOREQ_READY:
        return False
    barrier.rmb()
    keep = flags & ~STATE_MASK
    page[flags_at] = keep | STATE_IOREQ_INPROCESS
    addr, data, count, size, _eport, _pad, flags, typ = _unpack_slot(page, base)
    is_write = not flags & DIR_BIT
    if typ == IOREQ_TYPE_COPY and count == 1 and not flags & (DATA_IS_PTR_BIT | DF_BIT):
        result = bus.access(addr, size, is_write, data)
    else:
        result = bus.dispatch(IoRequest(addr, size, is_write, data, typ, count,
                                        bool(flags & DATA_IS_PTR_BIT), bool(flags & DF_BIT)))
    if not is_write:
        _pack_u64(page, base + SLOT_DATA_OFFSET, result & ALL_ONES)
    barrier.wmb()
    page[flags_at] = keep | STATE_IORESP_READY
    return True


# -- KVM ioregionfd (proposed; never merged) -------------------------------------------------------
# Command: u32 info, u32 pad, u64 user_data, u64 offset, u64 data. Response: u64 data, 24 pad.
IOREGIONFD_CMD = struct.Struct("<IIQQQ")
IOREGIONFD_RESP = struct.Struct("<Q24x")
IOREGIONFD_MSG_SIZE = 32
IOREGIONFD_CMD_READ = 0
IOREGIONFD_CMD_WRITE = 1
IOREGIONFD_CMD_MASK = 0x0F
IOREGIONFD_SIZE_SHIFT = 4
IOREGIONFD_SIZE_MASK = 0x3
IOREGIONFD_RESP_BIT = 1 << 6


class IoregionError(ValueError):
    """An ioregionfd command that is malformed (unknown cmd code, short message)."""


@dataclass(slots=True)
class IoregionCommand:
    """One decoded ioregionfd command. `offset` is relative to the region's start."""

    is_write: bool
    size: int
    response: bool
    user_data: int
    offset: int
    data: int

    def to_request(self, region_base: int) -> IoRequest:
        return IoRequest((region_base + self.offset) & ALL_ONES, self.size, self.is_write,
                         self.data & size_mask(self.size))


def decode_ioregion_cmd(buf: Buffer, offset: int = 0) -> IoregionCommand:
    if len(buf) - offset < IOREGIONFD_MSG_SIZE:
        raise IoregionError(f"ioregionfd command is {len(buf) - offset} bytes, not 32")
    info, _pad, user_data, off, data = IOREGIONFD_CMD.unpack_from(buf, offset)
    cmd = info & IOREGIONFD_CMD_MASK
    if cmd not in (IOREGIONFD_CMD_READ, IOREGIONFD_CMD_WRITE):
        raise IoregionError(f"ioregionfd command code {cmd} is neither read nor write")
    size = 1 << ((info >> IOREGIONFD_SIZE_SHIFT) & IOREGIONFD_SIZE_MASK)
    return IoregionCommand(cmd == IOREGIONFD_CMD_WRITE, size, bool(info & IOREGIONFD_RESP_BIT),
                           user_data, off, data)


def encode_ioregion_cmd(cmd: IoregionCommand) -> bytes:
    code = {1: 0, 2: 1, 4: 2, 8: 3}.get(cmd.size)
    if code is None:
        raise IoregionError(f"ioregionfd cannot carry a {cmd.size}-byte access")
    info = ((IOREGIONFD_CMD_WRITE if cmd.is_write else IOREGIONFD_CMD_READ)
            | code << IOREGIONFD_SIZE_SHIFT | (IOREGIONFD_RESP_BIT if cmd.response else 0))
    return IOREGIONFD_CMD.pack(info, 0, cmd.user_data & ALL_ONES, cmd.offset & ALL_ONES,
                               cmd.data & ALL_ONES)


def encode_ioregion_resp(data: int) -> bytes:
    return IOREGIONFD_RESP.pack(data & ALL_ONES)


def decode_ioregion_resp(buf: Buffer, offset: int = 0) -> int:
    value: int = IOREGIONFD_RESP.unpack_from(buf, offset)[0]
    return value
