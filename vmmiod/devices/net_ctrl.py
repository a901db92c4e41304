"""The virtio-net control virtqueue (VIRTIO 1.2, 5.1.6.5) and the receive filter it drives.

Sans-IO: `execute()` takes one command's class, code and payload (bytes already copied out of
guest memory, bounded in size) and returns the ack plus any effect the device must apply
(new MAC, new guest offloads). `RxFilter.accept()` decides per received frame from its
destination address, as QEMU's receive filter does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmmiod.devices.net_proto import (
    BROADCAST,
    ETH_ALEN,
    GUEST_OFFLOAD_MASK,
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    features_consistent,
)
from vmmiod.virtqueue import DescriptorChain, SplitQueue

VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1

VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1

VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5
VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET = 0

# Addresses kept per table; a longer list sets the overflow flag (accept that whole kind),
# as QEMU does, so a guest cannot make the daemon store an arbitrary list.
MAC_TABLE_ENTRIES = 64
# The largest command payload the device reads: two full tables with room to spare. A longer
# command is answered VIRTIO_NET_ERR without copying it.
CTRL_MAX_PAYLOAD = 4096
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


class RxFilter:
    """Receive filtering state: RX mode flags and the two MAC tables (5.1.6.5.1, 5.1.6.5.2)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # Promiscuous until the driver says otherwise: a driver that never sends RX mode
        # commands expects every frame (QEMU starts the same way).
        self.promisc = True
        self.allmulti = False
        self.unicast: frozenset[bytes] = frozenset()
        self.multicast: frozenset[bytes] = frozenset()
        self.uni_overflow = False
        self.multi_overflow = False

    def export(self) -> dict[str, Any]:
        """For the state record (docs/restart.md)."""
        return {"promisc": self.promisc, "allmulti": self.allmulti,
                "unicast": sorted(m.hex() for m in self.unicast),
                "multicast": sorted(m.hex() for m in self.multicast),
                "uni_overflow": self.uni_overflow, "multi_overflow": self.multi_overflow}

    def restore(self, state: dict[str, Any]) -> None:
        """Back from export() (an untrusted file: anything malformed leaves the filter open)."""
        try:
            flags = [state[k] for k in ("promisc", "allmulti", "uni_overflow", "multi_overflow")]
            tables = [frozenset(bytes.fromhex(m) for m in state[k][:MAC_TABLE_ENTRIES])
                      for k in ("unicast", "multicast")]
        except (KeyError, TypeError, ValueError):
            return
        if not all(isinstance(f, bool) for f in flags) or any(
                len(m) != ETH_ALEN for t in tables for m in t):
            return
        self.promisc, self.allmulti, self.uni_overflow, self.multi_overflow = flags
        self.unicast, self.multicast = tables

    def accept(self, dest: bytes, own_mac: bytes) -> bool:
        if self.promisc:
            return True
        if dest == BROADCAST:
            return True
        if dest[0] & 1:  # group address
            return self.allmulti or self.multi_overflow or dest in self.multicast
        return dest == own_mac or self.uni_overflow or dest in self.unicast


@dataclass
class CtrlResult:
    ack: int
    new_mac: bytes | None = None
    new_offloads: int | None = None  # the guest-offload feature bits now in force


def _mac_table(data: bytes, pos: int) -> tuple[frozenset[bytes], bool, int] | None:
    """One `virtio_net_ctrl_mac` table at `pos`: (entries, overflow, next pos) or None if short."""
    if pos + 4 > len(data):
        return None
    count = U32.unpack_from(data, pos)[0]
    pos += 4
    size = count * ETH_ALEN
    if size > len(data) - pos:
        return None
    overflow = count > MAC_TABLE_ENTRIES
    entries = frozenset() if overflow else frozenset(
        data[pos + i * ETH_ALEN: pos + (i + 1) * ETH_ALEN] for i in range(count))
    return entries, overflow, pos + size


def execute(rx_filter: RxFilter, cls: int, cmd: int, data: bytes, features: int,
            negotiated_offloads: int) -> CtrlResult:
    """Run one control command. Commands of classes not negotiated are answered ERR."""
    err = CtrlResult(VIRTIO_NET_ERR)

    def has(n: int) -> bool:
        return bool(features >> n & 1)

    if cls == VIRTIO_NET_CTRL_RX and has(VIRTIO_NET_F_CTRL_RX):
        if cmd not in (VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_ALLMULTI) or len(data) != 1:
            return err
        if cmd == VIRTIO_NET_CTRL_RX_PROMISC:
            rx_filter.promisc = bool(data[0])
        else:
            rx_filter.allmulti = bool(data[0])
        return CtrlResult(VIRTIO_NET_OK)
    if cls == VIRTIO_NET_CTRL_MAC:
        if cmd == VIRTIO_NET_CTRL_MAC_TABLE_SET and has(VIRTIO_NET_F_CTRL_RX):
            uni = _mac_table(data, 0)
            if uni is None:
                return err
            multi = _mac_table(data, uni[2])
            if multi is None or multi[2] != len(data):
                return err
            rx_filter.unicast, rx_filter.uni_overflow = uni[0], uni[1]
            rx_filter.multicast, rx_filter.multi_overflow = multi[0], multi[1]
            return CtrlResult(VIRTIO_NET_OK)
        if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET and has(VIRTIO_NET_F_CTRL_MAC_ADDR):
            if len(data) != ETH_ALEN or data[0] & 1:
                return err
            return CtrlResult(VIRTIO_NET_OK, new_mac=bytes(data))
        return err
    if cls == VIRTIO_NET_CTRL_GUEST_OFFLOADS and has(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS):
        if cmd != VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET or len(data) != 8:
            return err
        wanted = U64.unpack_from(data)[0]
        # Only offloads negotiated at FEATURES_OK may be switched back on (5.1.6.5.6.2).
        if wanted & ~(negotiated_offloads & GUEST_OFFLOAD_MASK):
            return err
        if not features_consistent(wanted | (features & ~GUEST_OFFLOAD_MASK)):
            return err
        return CtrlResult(VIRTIO_NET_OK, new_offloads=wanted)
    return err



def serve_controlq(q: SplitQueue, budget: int, rx_filter: RxFilter, features: int,
                   counters: dict[str, int], apply: Callable[[CtrlResult], None],
                   log: Any, pop: Callable[[], DescriptorChain | None] | None = None) -> int:
    """Answer up to `budget` commands on the control queue; returns how many were used.

    Each chain: class and command (readable), payload, then one writable ack byte. A chain
    without a command or without room for the ack is returned untouched and counted.
    """
    done = 0
    pop = q.pop if pop is None else pop
    while done < budget:
        chain = pop()
        if chain is None:
            if q.enable_notification():
                continue
            break
        done += 1
        counters["ctrl_commands"] += 1
        if chain.readable_len < 2 or chain.writable_len < 1:
            counters["ctrl_errors"] += 1
            q.add_used(chain.head, 0)
            continue
        head = chain.read(0, 2)
        ack = VIRTIO_NET_ERR
        if chain.readable_len - 2 <= CTRL_MAX_PAYLOAD:  # longer: refused without a copy
            result = execute(rx_filter, head[0], head[1], chain.read(2), features,
                             features & GUEST_OFFLOAD_MASK)
            ack = result.ack
            if ack == VIRTIO_NET_OK:
                apply(result)
        log.debug("net_ctrl_command", cls=head[0], cmd=head[1], ack=ack)
        if ack != VIRTIO_NET_OK:
            counters["ctrl_errors"] += 1
        chain.write(bytes((ack,)))
        q.add_used(chain.head, 1)
    return done
