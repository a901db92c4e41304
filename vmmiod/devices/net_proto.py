"""virtio-net wire facts (VIRTIO 1.2, section 5.1): feature bits, the header, config layout.

Sans-IO: constants, the transmit-header check (one named reason per rule, checked in order,
like Firecracker's request parsing) and small helpers over lists of memoryviews. The device
(net.py) and its backends (net_tap.py, net_dgram.py) share them.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import struct
from collections.abc import Callable
from typing import Any, Protocol

# -- feature bits (5.1.3) -----------------------------------------------------------------------------
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

# Offloads the driver may switch at run time with CTRL_GUEST_OFFLOADS (5.1.6.5.6.1).
GUEST_OFFLOAD_BITS = (VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
                      VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_UFO)
GUEST_OFFLOAD_MASK = sum(1 << b for b in GUEST_OFFLOAD_BITS)

# Feature dependencies the driver must respect (5.1.3.1): feature -> one of these required.
FEATURE_REQUIRES: dict[int, tuple[int, ...]] = {
    VIRTIO_NET_F_GUEST_TSO4: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_TSO6: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_ECN: (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6),
    VIRTIO_NET_F_GUEST_UFO: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_HOST_TSO4: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_TSO6: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_ECN: (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6),
    VIRTIO_NET_F_HOST_UFO: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_CTRL_RX: (VIRTIO_NET_F_CTRL_VQ,),
    VIRTIO_NET_F_CTRL_MAC_ADDR: (VIRTIO_NET_F_CTRL_VQ,),
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: (VIRTIO_NET_F_CTRL_VQ,),
}


# What the device offers on every backend, and the offloads only a TAP can carry.
NET_FEATURES = sum(1 << b for b in (
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_MAC_ADDR))
OFFLOAD_FEATURES = sum(1 << b for b in (
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS))
GUEST_GSO_MASK = sum(1 << b for b in (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
                                      VIRTIO_NET_F_GUEST_UFO))


def features_consistent(features: int) -> bool:
    for feat, needs in FEATURE_REQUIRES.items():
        if features >> feat & 1 and not any(features >> n & 1 for n in needs):
            return False
    return True


# -- the header (5.1.6) -------------------------------------------------------------------------------
NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
NET_HDR_LEN = 12  # with VERSION_1 or MRG_RXBUF
NET_HDR_LEN_LEGACY = 10  # legacy without MRG_RXBUF: no num_buffers
NUM_BUFFERS_OFFSET = 10
NET_HDR_10 = struct.Struct("<BBHHHH")  # the fields before num_buffers
U16 = struct.Struct("<H")

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4

VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

ETH_HLEN = 14
VLAN_HLEN = 4
ETH_ALEN = 6
# The largest frame either way: a 64 KiB GSO packet plus Ethernet and VLAN headers, plus the
# 12-byte header (the limit Firecracker and Linux's "big packets" use).
MAX_FRAME_WITH_HDR = 65562
MAX_GSO_FRAME = MAX_FRAME_WITH_HDR - NET_HDR_LEN

# -- config space (5.1.4) -----------------------------------------------------------------------------
CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
CONFIG_MAC_OFFSET = 0
VIRTIO_NET_S_LINK_UP = 1

BROADCAST = b"\xff" * ETH_ALEN


class TxDrop(enum.Enum):
    """Why a transmitted frame was dropped (the counter is `tx_dropped_<value>`)."""

    TOO_BIG = "too_big"
    BAD_HEADER = "bad_header"
    LINK_DOWN = "link_down"
    BACKEND_ERROR = "backend_error"
    NO_PEER = "no_peer"


class RxDrop(enum.Enum):
    """Why a received frame (or receive buffer) was dropped (`rx_dropped_<value>`)."""

    TOO_BIG = "too_big"
    FILTERED = "filtered"
    BAD_BUFFER = "bad_buffer"
    RUNT = "runt"
    FOREIGN_SENDER = "foreign_sender"


def check_tx_header(hdr: bytes | memoryview, chain_len: int, hdr_len: int,
                    features: int) -> TxDrop | None:
    """Each rule of 5.1.6.2 that a device must not trust, in order; None when the frame may go.

    `hdr` holds at least the first 10 bytes of the header when chain_len allows one.
    """
    if chain_len > MAX_FRAME_WITH_HDR:
        return TxDrop.TOO_BIG
    if chain_len < hdr_len + ETH_HLEN:
        return TxDrop.BAD_HEADER  # no room for a header and an Ethernet header
    flags, gso_type, _hlen, gso_size, csum_start, csum_offset = NET_HDR_10.unpack_from(hdr)
    if not flags and not gso_type:
        return None  # the common case: nothing to offload
    frame_len = chain_len - hdr_len
    if flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return TxDrop.BAD_HEADER  # DATA_VALID / RSC_INFO are device-to-driver only
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        if not features >> VIRTIO_NET_F_CSUM & 1:
            return TxDrop.BAD_HEADER
        if csum_start + csum_offset + 2 > frame_len:
            return TxDrop.BAD_HEADER
    base = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if base == VIRTIO_NET_HDR_GSO_NONE:
        return TxDrop.BAD_HEADER if gso_type & VIRTIO_NET_HDR_GSO_ECN else None
    need = {VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP: VIRTIO_NET_F_HOST_UFO}.get(base)
    if need is None or not features >> need & 1:
        return TxDrop.BAD_HEADER
    if gso_type & VIRTIO_NET_HDR_GSO_ECN and not features >> VIRTIO_NET_F_HOST_ECN & 1:
        return TxDrop.BAD_HEADER
    # A segmentation request needs a segment size and a partial checksum to finish (5.1.6.2).
    if gso_size == 0 or not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return TxDrop.BAD_HEADER
    return None


class NetBackendIO(Protocol):
    """What the device needs of a backend (net_tap.TapInterface, net_dgram.DgramSocket).

    `recv(iov, cap, hdr_len)` reads one frame with its header at the start of `iov` and
    returns its length (more than `cap`: it did not fit and is gone; negative: dropped for a
    backend reason); `send(views, hdr_len)` writes one (False: no peer to send to). Both raise
    BlockingIOError when they would block.
    """

    fd: int
    offloads: bool
    link_up: bool

    def describe(self) -> dict[str, Any]: ...
    def open(self, loop: asyncio.AbstractEventLoop,
             on_link: Callable[[bool], None]) -> None: ...
    def close(self) -> None: ...
    def configure(self, hdr_len: int, features: int) -> None: ...
    def recv(self, iov: list[memoryview], cap: int, hdr_len: int) -> int: ...
    def send(self, views: list[memoryview], hdr_len: int) -> bool: ...


# -- MAC addresses ------------------------------------------------------------------------------------
def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != ETH_ALEN or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r} is not six hex bytes separated by ':'")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"MAC address {text!r} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(guest: str, device_id: str) -> bytes:
    """Stable per (guest, device): unicast, locally administered (IEEE 802 U/L bit set)."""
    digest = bytearray(hashlib.sha256(f"{guest}\0{device_id}".encode()).digest()[:ETH_ALEN])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return bytes(digest)


# -- lists of memoryviews (scatter-gather in guest memory) --------------------------------------------
def skip_views(views: list[memoryview], n: int) -> list[memoryview]:
    """The same bytes without the first `n` (no copy)."""
    out = []
    for i, v in enumerate(views):
        k = len(v)
        if n < k:
            out.append(v[n:] if n else v)
            out.extend(views[i + 1:])
            return out
        n -= k
    return out


def gather(views: list[memoryview], offset: int, n: int) -> bytes:
    """Copy `n` bytes at `offset` out of a list of views (short if the views end first)."""
    out = bytearray()
    for v in views:
        k = len(v)
        if offset >= k:
            offset -= k
            continue
        take = min(k - offset, n - len(out))
        out += v[offset:offset + take]
        offset = 0
        if len(out) == n:
            break
    return bytes(out)


def scatter(views: list[memoryview], offset: int, data: bytes) -> int:
    """Copy `data` into the views from `offset`; returns bytes written."""
    pos = 0
    for v in views:
        k = len(v)
        if offset >= k:
            offset -= k
            continue
        take = min(k - offset, len(data) - pos)
        v[offset:offset + take] = data[pos:pos + take]
        pos += take
        offset = 0
        if pos == len(data):
            break
    return pos
