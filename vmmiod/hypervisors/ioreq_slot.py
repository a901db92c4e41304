"""The device-model side of the ioreq_t slot handshake, shared by the Xen and generic adaptors.

Both adaptors keep Xen's synchronous request page (one 32-byte `ioreq_t` per vCPU, layout in
vmmiod/ioreq.py); they differ only in how a slot is signalled (event channel, eventfd). This
module answers one slot: it reads the request, hands it to the bus and stores the answer, in the
order docs/xen.md and docs/generic-ioreq.md ("Serving requests") give. Values on the page are
untrusted and never used as anything but numbers handed to the bus.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vmmiod import barrier
from vmmiod.ioreq import (
    ALL_ONES,
    DATA_IS_PTR_BIT,
    DF_BIT,
    DIR_BIT,
    IOREQ_SIZE,
    IOREQ_T,
    IOREQ_TYPE_COPY,
    SLOT_DATA_OFFSET,
    SLOT_FLAGS_OFFSET,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
    STATE_MASK,
    U64,
    IoRequest,
    WritableBuffer,
)

if TYPE_CHECKING:
    from vmmiod.bus import MmioBus

_unpack_slot = IOREQ_T.unpack_from
_pack_u64 = U64.pack_into


def serve_ioreq_slot(page: WritableBuffer, vcpu: int, bus: MmioBus, resume: bool = False) -> bool:
    """Answer vCPU `vcpu`'s pending ioreq_t on `page`, if it has one. True: notify the vCPU.

    Xen's order (docs/xen.md): proceed only on READY; read barrier before reading the request;
    INPROCESS; work; for reads store `data`; write barrier so the peer sees the data before the
    state; IORESP_READY. Each state change is one byte store that keeps the other bits of the
    byte (data_is_ptr, dir, df, the reserved bit 7). State NONE and vp_eport belong to the
    hypervisor (or the VMM) and are never written: moving the state backwards crashes a Xen
    guest. With `resume` (a new daemon taking over, docs/restart.md) an INPROCESS slot is served
    too: the daemon that took it died before answering, and the vCPU still waits; and a slot
    left IORESP_READY returns True untouched: that daemon answered but died before signalling,
    so the vCPU waits for the signal.
    """
    return slot_server(page, vcpu, bus, resume)()


def slot_server(page: WritableBuffer, vcpu: int, bus: MmioBus,
                resume: bool = False) -> Callable[[], bool]:
    """`serve_ioreq_slot(page, vcpu, bus, resume)` as a function of no arguments: the one
    implementation of the slot handshake (serve_ioreq_slot calls it once).

    Both adaptors build one per vCPU (the generic one when a guest connects, the Xen server when
    it binds the vCPU's port) and call it on every wake-up of that vCPU: the slot's offsets, the
    page and the bus's fast path are bound once instead of per request; the barriers are looked up at call time (they are installed at start-up).
    """
    if not 0 <= vcpu < len(page) // IOREQ_SIZE:
        raise ValueError(f"vCPU {vcpu} has no slot on a page of {len(page)} bytes")
    base = vcpu * IOREQ_SIZE
    flags_at = base + SLOT_FLAGS_OFFSET
    data_at = base + SLOT_DATA_OFFSET
    access = bus.access
    dispatch = bus.dispatch
    unpack = _unpack_slot
    pack_u64 = _pack_u64

    def serve() -> bool:
        flags = page[flags_at]
        state = flags & STATE_MASK
        if state != STATE_IOREQ_READY:
            if not resume:
                return False
            if state == STATE_IORESP_READY:
                return True  # answered by a daemon that died before signalling
            if state != STATE_IOREQ_INPROCESS:
                return False
        barrier.rmb()
        keep = flags & ~STATE_MASK
        page[flags_at] = keep | STATE_IOREQ_INPROCESS
        addr, data, count, size, _eport, _pad, flags, typ = unpack(page, base)
        if flags & DIR_BIT:
            if typ == IOREQ_TYPE_COPY and count == 1 and not flags & (DATA_IS_PTR_BIT | DF_BIT):
                result = access(addr, size, False, data)
            else:
                result = dispatch(IoRequest(addr, size, False, data, typ, count,
                                            bool(flags & DATA_IS_PTR_BIT), bool(flags & DF_BIT)))
            pack_u64(page, data_at, result & ALL_ONES)
        elif typ == IOREQ_TYPE_COPY and count == 1 and not flags & (DATA_IS_PTR_BIT | DF_BIT):
            access(addr, size, True, data)
        else:
            dispatch(IoRequest(addr, size, True, data, typ, count,
                               bool(flags & DATA_IS_PTR_BIT), bool(flags & DF_BIT)))
        barrier.wmb()
        page[flags_at] = keep | STATE_IORESP_READY
        return True

    return serve
