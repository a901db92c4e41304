"""Linux network interfaces for the TAP backend: names, set-up ioctls, rtnetlink link messages.

The classic socket ioctls (struct ifreq on an AF_INET datagram socket) read and set an
interface's flags and MTU and add it to a bridge, so no `ip` binary is needed; an rtnetlink
socket bound to RTMGRP_LINK reports links created, changed and deleted. The TAP itself
(/dev/net/tun) is vmmiod/devices/net_tap.py.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
SIOCGIFMTU = 0x8921
SIOCBRADDIF = 0x89A2
IFF_UP = 0x1
IFF_RUNNING = 0x40

IFNAMSIZ = 16
IFREQ_FLAGS = struct.Struct("16sH22x")  # struct ifreq with ifr_flags
IFREQ_INT = struct.Struct("16si20x")  # struct ifreq with ifr_ifindex / ifr_mtu

# rtnetlink: a link message is nlmsghdr (16 bytes) then ifinfomsg.
NETLINK_ROUTE = 0
RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
NLMSGHDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")

def interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


class IfControl:
    """Set-up ioctls on a control socket. OSError from the kernel passes through."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def close(self) -> None:
        self.sock.close()

    def _ioctl(self, req: int, arg: bytes) -> bytes:
        return fcntl.ioctl(self.sock.fileno(), req, arg)

    def flags(self, name: str) -> int:
        flags: int = IFREQ_FLAGS.unpack(self._ioctl(SIOCGIFFLAGS,
                                                    IFREQ_FLAGS.pack(name.encode(), 0)))[1]
        return flags

    def set_flags(self, name: str, mask: int, value: int) -> None:
        cur = self.flags(name)
        self._ioctl(SIOCSIFFLAGS, IFREQ_FLAGS.pack(name.encode(), (cur & ~mask) | value))

    def mtu(self, name: str) -> int:
        mtu: int = IFREQ_INT.unpack(self._ioctl(SIOCGIFMTU, IFREQ_INT.pack(name.encode(), 0)))[1]
        return mtu

    def set_mtu(self, name: str, mtu: int) -> None:
        self._ioctl(SIOCSIFMTU, IFREQ_INT.pack(name.encode(), mtu))

    def add_to_bridge(self, bridge: str, ifindex: int) -> None:
        self._ioctl(SIOCBRADDIF, IFREQ_INT.pack(bridge.encode(), ifindex))

    def link_up(self, name: str) -> bool:
        """Administratively up and running (carrier); False for an interface that is gone."""
        try:
            flags = self.flags(name)
        except OSError:
            return False
        return bool(flags & IFF_UP and flags & IFF_RUNNING)


def link_monitor() -> socket.socket:
    """A non-blocking rtnetlink socket that receives every link change (RTMGRP_LINK)."""
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                       | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        nl.bind((0, RTMGRP_LINK))
    except OSError:
        nl.close()
        raise
    return nl


def read_link_changes(nl: socket.socket) -> tuple[set[int], bool]:
    """Drain the monitor: (interface indexes of the link messages read, whether events were
    lost (ENOBUFS), so the caller re-reads the state it cares about)."""
    indexes: set[int] = set()
    lost = False
    while True:
        try:
            data = nl.recv(65536)
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # events lost: re-read the state
                lost = True
                continue
            break
        pos = 0
        while pos + NLMSGHDR.size <= len(data):
            length, kind = NLMSGHDR.unpack_from(data, pos)[:2]
            if length < NLMSGHDR.size:
                break
            if kind in (RTM_NEWLINK, RTM_DELLINK) and \
                    pos + NLMSGHDR.size + IFINFOMSG.size <= len(data):
                indexes.add(IFINFOMSG.unpack_from(data, pos + NLMSGHDR.size)[2])
            pos += (length + 3) & ~3
    return indexes, lost
