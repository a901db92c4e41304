"""The generic channel's wire protocol, sans-IO: packing, parsing and every hello rule."""

from __future__ import annotations

import pytest

from vmmiod.hypervisors.generic import protocol as p


def hello(**kw: object) -> p.ClientHello:
    base = dict(version=p.VERSION, n_vcpus=2,
                regions=(p.RegionSpec(0x4000_0000, 1 << 20),),
                irqs=(p.IrqSpec(33), p.IrqSpec(34, p.IRQ_MODE_LEVEL)))
    base.update(kw)
    return p.ClientHello(**base)  # type: ignore[arg-type]


def test_client_hello_round_trip_and_fd_count() -> None:
    h = hello(regions=(p.RegionSpec(0x4000_0000, 1 << 20),
                       p.RegionSpec(0x8000_0000, 1 << 16, 4096, readonly=True)))
    back = p.parse_client_hello(p.pack_client_hello(h))
    assert back == h
    # 2 regions + page + 2 x 2 vCPU eventfds + 1 eventfd line (the level line has no fd)
    assert back.fd_count() == 2 + 1 + 4 + 1


def test_server_hello_round_trip() -> None:
    windows = [p.Window(0x200_0000, 0x200, 33), p.Window(0x200_0200, 0x200, 34)]
    sh = p.parse_server_hello(p.pack_server_hello(windows))
    assert sh.windows == tuple(windows)
    assert sh.max_vcpus == p.MAX_VCPUS and sh.flags & p.SERVER_F_LEVEL_IRQ


def test_refuse_carries_reason_and_text() -> None:
    data = p.pack_refuse(p.REFUSE_PAGE, "ioreq page: wrong size")
    assert p.parse_header(data)[1] == p.MSG_REFUSE
    assert p.parse_refuse(data) == (p.REFUSE_PAGE, "ioreq page: wrong size")


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: b[:4], p.REFUSE_MALFORMED),  # shorter than a header
    (lambda b: b"XXXX" + b[4:], p.REFUSE_MALFORMED),  # bad magic
    (lambda b: b[:-1], p.REFUSE_MALFORMED),  # truncated irq table
    (lambda b: b + b"\0", p.REFUSE_MALFORMED),  # trailing byte
    (lambda b: p.header(p.MSG_CLIENT_HELLO, 2) + b[8:], p.REFUSE_VERSION),
    (lambda b: p.header(p.MSG_BYE) + b[8:], p.REFUSE_MALFORMED),  # not a hello
])
def test_malformed_hellos(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    data = mutate(p.pack_client_hello(hello()))
    with pytest.raises(p.ProtocolError) as exc:
        p.parse_client_hello(data)
    assert exc.value.reason == reason


@pytest.mark.parametrize("h, reason", [
    (hello(n_vcpus=0), p.REFUSE_VCPUS),
    (hello(n_vcpus=p.MAX_VCPUS + 1), p.REFUSE_VCPUS),
    (hello(regions=()), p.REFUSE_REGIONS),
    (hello(regions=(p.RegionSpec(0x1000, 0),)), p.REFUSE_REGIONS),  # empty
    (hello(regions=(p.RegionSpec(0x1001, 0x1000),)), p.REFUSE_REGIONS),  # misaligned gpa
    (hello(regions=(p.RegionSpec(0x1000, 0x1800),)), p.REFUSE_REGIONS),  # misaligned size
    (hello(regions=(p.RegionSpec(0x1000, 0x1000, 12),)), p.REFUSE_REGIONS),  # fd offset
    (hello(regions=(p.RegionSpec((1 << 64) - 0x1000, 0x2000),)), p.REFUSE_REGIONS),  # wraps
    (hello(regions=(p.RegionSpec(0x10000, 0x4000), p.RegionSpec(0x12000, 0x4000))),
     p.REFUSE_REGIONS),  # overlap
    (hello(irqs=(p.IrqSpec(33), p.IrqSpec(33))), p.REFUSE_IRQS),  # twice
    (hello(irqs=(p.IrqSpec(33, 7),)), p.REFUSE_IRQS),  # unknown mode
])
def test_hello_rules(h: p.ClientHello, reason: int) -> None:
    with pytest.raises(p.ProtocolError) as exc:
        p.parse_client_hello(p.pack_client_hello(h))
    assert exc.value.reason == reason


def test_adjacent_regions_are_fine() -> None:
    h = hello(regions=(p.RegionSpec(0x10000, 0x4000), p.RegionSpec(0x14000, 0x4000)))
    assert p.parse_client_hello(p.pack_client_hello(h)) == h
