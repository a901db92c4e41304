"""The ioreq_t codec against bytes built independently, and the slot handshake.

The expected bytes are built here field by field (each field packed on its own at its offset
from xen/include/public/hvm/ioreq.h, the bitfield byte assembled by hand), so a codec that got
an offset or a bit position wrong cannot agree with them by construction.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_mmio_rig import Rig, bring_up, make_rig
from vmmiod import barrier
from vmmiod.bus import MmioBus
from vmmiod.hypervisors.ioreq_slot import serve_ioreq_slot, slot_server
from vmmiod.ioreq import (
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_INVALIDATE,
    IOREQ_TYPE_PIO,
    IOREQ_WRITE,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_NONE,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
    IoRequest,
    XenIoreq,
    decode_ioreq,
    encode_ioreq,
    pack_ioreq_into,
)
from vmmiod.memory import MappedMemory
from vmmiod.mmio_regs import CONFIG, MAGIC_VALUE, MAGIC_VALUE_VIRT, QUEUE_NOTIFY, WINDOW_SIZE

BASE = 0x0200_0000


def xen_bytes(addr: int, data: int, count: int, size: int, vp_eport: int, state: int,
              data_is_ptr: int, dir_: int, df: int, type_: int, pad0: int = 0,
              pad1: int = 0) -> bytes:
    """One ioreq_t, each field at its own offset; the bitfield byte by hand."""
    out = bytearray(32)
    struct.pack_into("<Q", out, 0, addr)
    struct.pack_into("<Q", out, 8, data)
    struct.pack_into("<I", out, 16, count)
    struct.pack_into("<I", out, 20, size)
    struct.pack_into("<I", out, 24, vp_eport)
    struct.pack_into("<H", out, 28, pad0)
    # uint8_t state:4, data_is_ptr:1, dir:1, df:1, _pad1:1 (allocated from bit 0 up)
    out[30] = state | data_is_ptr << 4 | dir_ << 5 | df << 6 | pad1 << 7
    out[31] = type_
    return bytes(out)


def test_ioreq_known_layout() -> None:
    # An Arm guest's 4-byte MMIO read of 0x02000050 from vCPU 0, port 17, as Xen hands it over.
    raw = xen_bytes(0x0200_0050, 0, 1, 4, 17, STATE_IOREQ_READY, 0, 1, 0, IOREQ_TYPE_COPY)
    assert raw.hex() == ("5000000200000000" "0000000000000000" "01000000" "04000000"
                         "11000000" "0000" "21" "01")
    req = decode_ioreq(raw)
    assert req == XenIoreq(0x0200_0050, 0, 1, 4, 17, STATE_IOREQ_READY, False, IOREQ_READ,
                           False, IOREQ_TYPE_COPY)
    assert encode_ioreq(req) == raw


@given(addr=st.integers(0, 2**64 - 1), data=st.integers(0, 2**64 - 1),
       count=st.integers(0, 2**32 - 1), size=st.integers(0, 2**32 - 1),
       eport=st.integers(0, 2**32 - 1), state=st.integers(0, 15), ptr=st.integers(0, 1),
       dir_=st.integers(0, 1), df=st.integers(0, 1), type_=st.integers(0, 255),
       pad0=st.integers(0, 0xFFFF), pad1=st.integers(0, 1))
def test_ioreq_codec_matches_field_by_field_bytes(addr: int, data: int, count: int, size: int,
                                                  eport: int, state: int, ptr: int, dir_: int,
                                                  df: int, type_: int, pad0: int,
                                                  pad1: int) -> None:
    raw = xen_bytes(addr, data, count, size, eport, state, ptr, dir_, df, type_, pad0, pad1)
    req = decode_ioreq(raw)
    assert (req.addr, req.data, req.count, req.size, req.vp_eport, req.state) == (
        addr, data, count, size, eport, state)
    assert (req.data_is_ptr, req.dir, req.df, req.type) == (bool(ptr), dir_, bool(df), type_)
    # Encoding writes zeros into the reserved fields.
    assert encode_ioreq(req) == xen_bytes(addr, data, count, size, eport, state, ptr, dir_, df,
                                          type_)
    # ... and decoding at an offset inside a page works the same.
    page = bytearray(4096)
    page[5 * 32:6 * 32] = raw
    assert decode_ioreq(page, 5 * 32) == req
    other = bytearray(64)
    pack_ioreq_into(other, 32, req)
    assert bytes(other[32:]) == encode_ioreq(req) and bytes(other[:32]) == bytes(32)


def test_ioreq_to_request() -> None:
    x = XenIoreq(0x1000, 0xAB, 1, 2, 3, STATE_IOREQ_READY, False, IOREQ_WRITE, False,
                 IOREQ_TYPE_COPY)
    assert x.to_request() == IoRequest(0x1000, 2, True, 0xAB, IOREQ_TYPE_COPY, 1, False, False)


# -- serve_ioreq_slot ----------------------------------------------------------------------------
@pytest.fixture
def page() -> Iterator[mmap.mmap]:
    m = mmap.mmap(-1, 4096)  # the shape of the mapped ioreq server page
    yield m
    m.close()


@pytest.fixture
def rig() -> Rig:
    return make_rig(2)


@pytest.fixture
def bus(rig: Rig) -> MmioBus:
    b = MmioBus()
    b.register(BASE, WINDOW_SIZE, rig.window)
    b.attach_memory(rig.memory)
    return b


Serve = Callable[[mmap.mmap, int, MmioBus], bool]


def _through_slot_server(page: mmap.mmap, vcpu: int, bus: MmioBus) -> bool:
    return slot_server(page, vcpu, bus)()


@pytest.fixture(params=["serve_ioreq_slot", "slot_server"])
def serve(request: pytest.FixtureRequest) -> Serve:
    """Both ways of answering a slot: every case below holds for each (they must not drift)."""
    return serve_ioreq_slot if request.param == "serve_ioreq_slot" else _through_slot_server


def put(page: mmap.mmap, vcpu: int, **fields: int) -> None:
    f = {"addr": 0, "data": 0, "count": 1, "size": 4, "vp_eport": 40 + vcpu,
         "state": STATE_IOREQ_READY, "data_is_ptr": 0, "dir_": IOREQ_READ, "df": 0,
         "type_": IOREQ_TYPE_COPY}
    f.update(fields)
    page[vcpu * 32:(vcpu + 1) * 32] = xen_bytes(**f)


def test_slot_not_ready_is_left_alone(page: mmap.mmap, bus: MmioBus, serve: Serve) -> None:
    for state in (STATE_IOREQ_NONE, STATE_IOREQ_INPROCESS, STATE_IORESP_READY, 9):
        put(page, 0, addr=BASE, state=state)
        before = page[:]
        assert serve(page, 0, bus) is False
        assert page[:] == before
    assert bus.requests == 0


def test_slot_left_in_process_by_a_dead_daemon_is_served_on_resume(page: mmap.mmap,
                                                                     bus: MmioBus) -> None:
    """A new daemon taking over (docs/restart.md) answers INPROCESS too: the vCPU still waits."""
    put(page, 1, addr=BASE + MAGIC_VALUE, state=STATE_IOREQ_INPROCESS)
    assert serve_ioreq_slot(page, 1, bus) is False
    assert serve_ioreq_slot(page, 1, bus, resume=True) is True
    x = decode_ioreq(page, 32)
    assert x.state == STATE_IORESP_READY and x.data == MAGIC_VALUE_VIRT
    requests = bus.requests
    put(page, 1, addr=BASE, state=STATE_IOREQ_NONE)  # nothing pending: left alone
    assert serve_ioreq_slot(page, 1, bus, resume=True) is False
    # Answered by the dead daemon, which died before signalling: signal it, redo nothing.
    put(page, 1, addr=BASE, state=STATE_IORESP_READY, data=7)
    before = page[:]
    assert serve_ioreq_slot(page, 1, bus, resume=True) is True
    assert page[:] == before and bus.requests == requests


def test_slot_read_answers_data_and_state_only(page: mmap.mmap, bus: MmioBus, serve: Serve) -> None:
    put(page, 3, addr=BASE + MAGIC_VALUE, data=0xDEAD_BEEF_0000_0000, df=0)
    page[30 + 3 * 32] |= 0x80  # the reserved bit, which must survive
    assert serve(page, 3, bus) is True
    x = decode_ioreq(page, 3 * 32)
    assert x.state == STATE_IORESP_READY and x.data == MAGIC_VALUE_VIRT
    assert x.vp_eport == 43 and x.addr == BASE + MAGIC_VALUE and x.dir == IOREQ_READ
    assert page[30 + 3 * 32] & 0x80
    assert page[:3 * 32] == bytes(96) and page[4 * 32:] == bytes(4096 - 128)


def test_slot_write_leaves_data_alone(page: mmap.mmap, bus: MmioBus, rig: Rig,
                                      serve: Serve) -> None:
    dqs = bring_up(rig)
    out, in_ = rig.buffer(b"xen!"), rig.buffer(4)
    dqs[1].add([out], [in_], token=1)
    dqs[1].kick_prepare()
    put(page, 0, addr=BASE + QUEUE_NOTIFY, data=1, dir_=IOREQ_WRITE)
    expect = bytearray(xen_bytes(BASE + QUEUE_NOTIFY, 1, 1, 4, 40, STATE_IORESP_READY, 0,
                                 IOREQ_WRITE, 0, IOREQ_TYPE_COPY))
    assert serve(page, 0, bus) is True
    assert page[:32] == expect
    assert rig.memory.read(in_[0], 4) == b"!nex"


def test_slot_config_read_sizes(page: mmap.mmap, bus: MmioBus, serve: Serve) -> None:
    for size, expect in ((1, 0x10), (2, 0x1110), (4, 0x1312_1110), (8, 0x1716_1514_1312_1110)):
        put(page, 1, addr=BASE + CONFIG, size=size, data=2**64 - 1)
        assert serve(page, 1, bus)
        assert decode_ioreq(page, 32).data == expect


def test_slot_unhandled_and_invalidate(page: mmap.mmap, bus: MmioBus, serve: Serve) -> None:
    put(page, 0, addr=0x3F8, size=1, type_=IOREQ_TYPE_PIO)
    assert serve(page, 0, bus)
    assert decode_ioreq(page).data == 0xFF and decode_ioreq(page).state == STATE_IORESP_READY
    put(page, 0, addr=BASE, count=2)  # rep: all ones
    assert serve(page, 0, bus) and decode_ioreq(page).data == 0xFFFF_FFFF
    put(page, 0, addr=BASE, data_is_ptr=1, dir_=IOREQ_WRITE, data=0x4000_0000)
    assert serve(page, 0, bus) and decode_ioreq(page).data == 0x4000_0000
    mem = bus.memory
    assert isinstance(mem, MappedMemory)
    gen = mem.generation
    put(page, 0, addr=0, data=2**64 - 1, size=8, dir_=IOREQ_WRITE, type_=IOREQ_TYPE_INVALIDATE)
    assert serve(page, 0, bus)
    assert mem.generation == gen + 1 and decode_ioreq(page).state == STATE_IORESP_READY
    assert bus.unhandled == {"pio": 1, "rep": 1, "data_is_ptr": 1}


def test_slot_works_on_a_memoryview_and_bytearray(bus: MmioBus, serve: Serve) -> None:
    buf = bytearray(4096)
    for page in (buf, memoryview(buf)):
        put(page, 127, addr=BASE + MAGIC_VALUE)  # type: ignore[arg-type]
        assert serve(page, 127, bus)
        assert decode_ioreq(page, 127 * 32).data == MAGIC_VALUE_VIRT


def test_slot_barriers_order_the_stores(page: mmap.mmap, bus: MmioBus, serve: Serve) -> None:
    """rmb after seeing READY, before reading the request; wmb after the data, before the state."""
    seen: list[tuple[str, int, int]] = []

    def snap(name: str) -> Callable[[], None]:
        return lambda: seen.append((name, page[30] & 0xF, struct.unpack_from("<Q", page, 8)[0]))

    saved = barrier.mb, barrier.wmb, barrier.rmb
    barrier.install(snap("mb"), snap("wmb"), snap("rmb"))
    try:
        put(page, 0, addr=BASE + MAGIC_VALUE, data=0)
        assert serve(page, 0, bus)
    finally:
        barrier.mb, barrier.wmb, barrier.rmb = saved
    assert seen == [("rmb", STATE_IOREQ_READY, 0),
                    ("wmb", STATE_IOREQ_INPROCESS, MAGIC_VALUE_VIRT)]
    assert page[30] & 0xF == STATE_IORESP_READY


def test_slot_server_is_built_once_and_serves_every_request(page: mmap.mmap,
                                                            bus: MmioBus) -> None:
    """The adaptor builds one per vCPU at connect time: it answers each new READY request, leaves
    a slot that is not READY alone, and takes fences installed after it was built."""
    srv = slot_server(page, 2, bus)
    assert srv() is False  # NONE: nothing asked
    for data in (1, 2, 3):
        put(page, 2, addr=BASE + MAGIC_VALUE, data=data)
        assert srv() is True
        assert decode_ioreq(page, 64).data == MAGIC_VALUE_VIRT
        assert srv() is False  # IORESP_READY: already answered, nothing more
    fences: list[str] = []
    saved = barrier.mb, barrier.wmb, barrier.rmb
    barrier.install(lambda: fences.append("mb"), lambda: fences.append("wmb"),
                    lambda: fences.append("rmb"))
    try:
        put(page, 2, addr=BASE + MAGIC_VALUE)
        assert srv() is True
    finally:
        barrier.mb, barrier.wmb, barrier.rmb = saved
    assert fences == ["rmb", "wmb"]
    assert bus.requests == 4


@pytest.mark.parametrize("vcpu", [-1, 128])
def test_slot_server_refuses_a_vcpu_without_a_slot(page: mmap.mmap, bus: MmioBus,
                                                   vcpu: int) -> None:
    with pytest.raises(ValueError):
        slot_server(page, vcpu, bus)
