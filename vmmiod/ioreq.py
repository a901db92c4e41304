"""IOREQs: the neutral request and the codec of Xen's ioreq_t.

Every hypervisor adaptor turns what it receives into an `IoRequest` (or, on the hot path, into
the same four fields passed straight to `MmioBus.access`). The wire format here is Xen's 32-byte
`ioreq_t` (Xen's public header hvm/ioreq.h; the layout is in docs/xen.md and, for the generic
channel, which shares the page, in docs/generic-ioreq.md). The slot handshake itself is served
by vmmiod/hypervisors/ioreq_slot.py. (KVM's proposed ioregionfd format was here once; it was
removed, see docs/generic-ioreq.md, "Why not ioregionfd".)

Nothing here knows devices or registers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import mmap

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
