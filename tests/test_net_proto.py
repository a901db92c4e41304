"""virtio-net sans-IO parts: transmit header rules, control commands, names and MACs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmiod.devices.net_ctrl import (
    MAC_TABLE_ENTRIES,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
    RxFilter,
    execute,
)
from vmmiod.devices.net_proto import (
    MAX_FRAME_WITH_HDR,
    NET_FEATURES,
    OFFLOAD_FEATURES,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    TxDrop,
    check_tx_header,
    default_mac,
    gather,
    parse_mac,
    scatter,
    skip_views,
)
from vmmiod.devices.net_tap import tun_offload_flags
from vmmiod.ifnames import default_ifname

ALL = NET_FEATURES | OFFLOAD_FEATURES


def B(*bits: int) -> int:
    return sum(1 << b for b in bits)


def hdr(flags: int = 0, gso: int = 0, gso_size: int = 0, start: int = 0, off: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso, 0, gso_size, start, off, 0)


@pytest.mark.parametrize("header, length, features, want", [
    (hdr(), 12 + 60, 0, None),
    (hdr(), 12 + 13, 0, TxDrop.BAD_HEADER),  # no Ethernet header
    (hdr(), MAX_FRAME_WITH_HDR + 1, ALL, TxDrop.TOO_BIG),
    (hdr(), MAX_FRAME_WITH_HDR, ALL, None),
    (hdr(flags=2), 100, ALL, TxDrop.BAD_HEADER),  # DATA_VALID from the driver
    (hdr(flags=1, start=34, off=6), 100, 0, TxDrop.BAD_HEADER),  # CSUM not negotiated
    (hdr(flags=1, start=34, off=6), 100, B(VIRTIO_NET_F_CSUM), None),
    (hdr(flags=1, start=81, off=6), 100, B(VIRTIO_NET_F_CSUM), TxDrop.BAD_HEADER),  # past end
    (hdr(flags=1, start=80, off=6), 100, B(VIRTIO_NET_F_CSUM), None),  # last two bytes
    (hdr(flags=1, gso=1, gso_size=1448, start=34, off=16), 9000, ALL, None),
    (hdr(flags=1, gso=1, gso_size=1448, start=34, off=16), 9000,
     B(VIRTIO_NET_F_CSUM), TxDrop.BAD_HEADER),  # HOST_TSO4 not negotiated
    (hdr(flags=1, gso=1, gso_size=0, start=34, off=16), 9000, ALL, TxDrop.BAD_HEADER),
    (hdr(flags=0, gso=1, gso_size=1448), 9000, ALL, TxDrop.BAD_HEADER),  # no partial csum
    (hdr(flags=1, gso=0x81, gso_size=1448, start=34, off=16), 9000,
     B(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4), TxDrop.BAD_HEADER),  # ECN not negotiated
    (hdr(flags=1, gso=0x81, gso_size=1448, start=34, off=16), 9000,
     B(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_ECN), None),
    (hdr(gso=0x80), 100, ALL, TxDrop.BAD_HEADER),  # ECN without a GSO type
    (hdr(flags=1, gso=3, gso_size=1400, start=34, off=6), 9000, ALL, TxDrop.BAD_HEADER),  # UFO
])
def test_tx_header_rules(header: bytes, length: int, features: int, want: TxDrop | None) -> None:
    assert check_tx_header(header, length, 12, features) == want


@given(st.binary(min_size=10, max_size=12), st.integers(0, 1 << 32), st.integers(0, 1 << 40))
def test_tx_header_check_never_raises(header: bytes, length: int, features: int) -> None:
    assert check_tx_header(header, length, 12, features) in (None, *TxDrop)


def test_mac_table_overflow_and_rx_filter() -> None:
    f = RxFilter()
    own = bytes.fromhex("020000000001")
    many = b"".join(bytes((2, 0, 0, 0, i >> 8, i & 255)) for i in range(MAC_TABLE_ENTRIES + 1))
    data = struct.pack("<I", MAC_TABLE_ENTRIES + 1) + many + struct.pack("<I", 0)
    feats = ALL
    assert execute(f, VIRTIO_NET_CTRL_RX, 0, b"\0", feats, 0).ack == VIRTIO_NET_OK
    assert execute(f, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, data, feats,
                   0).ack == VIRTIO_NET_OK
    assert f.uni_overflow and not f.unicast  # too many: accept every unicast, store none
    assert f.accept(bytes.fromhex("02ffffffffff"), own)
    assert not f.accept(bytes.fromhex("01005e000001"), own)
    # trailing bytes after the second table are an error; so is RX without CTRL_RX
    assert execute(f, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
                   struct.pack("<II", 0, 0) + b"x", feats, 0).ack == VIRTIO_NET_ERR
    assert execute(RxFilter(), VIRTIO_NET_CTRL_RX, 0, b"\0", 0, 0).ack == VIRTIO_NET_ERR
    # guest offloads: only those negotiated, and consistent (TSO4 needs CSUM)
    negotiated = B(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4)
    tso_only = struct.pack("<Q", B(VIRTIO_NET_F_GUEST_TSO4))
    assert execute(f, VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0, tso_only, feats,
                   negotiated).ack == VIRTIO_NET_ERR
    r = execute(f, VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0, struct.pack("<Q", negotiated), feats,
                negotiated)
    assert r.ack == VIRTIO_NET_OK and r.new_offloads == negotiated


def test_tun_offload_flags_follow_the_guest() -> None:
    assert tun_offload_flags(B(VIRTIO_NET_F_GUEST_TSO4)) == 0  # no TSO without a checksum
    assert tun_offload_flags(B(VIRTIO_NET_F_GUEST_CSUM)) == 0x01
    assert tun_offload_flags(B(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
                               VIRTIO_NET_F_GUEST_ECN)) == 0x01 | 0x02 | 0x08


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_default_ifname_and_mac_are_valid_and_stable(guest: str, dev: str) -> None:
    name = default_ifname(guest, dev)
    assert 1 <= len(name) <= 15 and "/" not in name and " " not in name
    assert name == default_ifname(guest, dev)
    mac = default_mac(guest, dev)
    assert len(mac) == 6 and mac[0] & 0b11 == 0b10


def test_parse_mac_rejects_bad_addresses() -> None:
    assert parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    for bad in ("52:54:00:12:34", "01:00:5e:00:00:01", "zz:54:00:12:34:56"):
        with pytest.raises(ValueError):
            parse_mac(bad)


def test_view_helpers() -> None:
    a, b = bytearray(b"abcd"), bytearray(b"efgh")
    views = [memoryview(a), memoryview(b)]
    assert [bytes(v) for v in skip_views(views, 5)] == [b"fgh"]
    assert gather(views, 2, 4) == b"cdef"
    assert scatter(views, 3, b"XYZ") == 3 and (a, b) == (bytearray(b"abcX"), bytearray(b"YZgh"))
