"""The TAP backend of virtio-net: /dev/net/tun with a virtio-net header on every frame.

The TAP is opened IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, so the kernel reads and writes the same
header the guest uses: checksum and segmentation offloads pass straight through (TUNSETOFFLOAD
says which ones the guest takes on receive; TUNSETVNETHDRSZ the header size). Interface
set-up (MTU, bridge port, IFF_UP) uses the classic socket ioctls, so no `ip` binary is needed.
Link changes come from an rtnetlink socket (RTMGRP_LINK) and are confirmed with SIOCGIFFLAGS
(both in vmmiod/devices/net_ifctl.py).

A TAP deleted under us (its name gone or renumbered, or EBADFD from the fd) is let go: the
device unwatches the fd, it is closed and the link reported down. When an interface of our name
appears again it is attached with the same set-up; with `create: true` the daemon recreates it
itself if the name is still free after RECREATE_DELAY (the operator may be recreating it).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from vmmiod.config import TapBackend
from vmmiod.devices.base import BackendError
from vmmiod.devices.net_ifctl import (
    IFF_UP,
    IFREQ_FLAGS,
    IfControl,
    interface_exists,
    link_monitor,
    read_link_changes,
)
from vmmiod.devices.net_proto import (
    MAX_FRAME_WITH_HDR,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
)
from vmmiod.ifnames import IFNAME_RE, default_ifname

TUN_PATH = "/dev/net/tun"
# ioctl numbers (_IOW('T', n, int) etc.; the same encoding on x86-64 and arm64).
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO = 0x01, 0x02, 0x04, 0x08, 0x10

# A deleted TAP we may create: wait this long for the operator to recreate it before we do.
RECREATE_DELAY = 2.0
REATTACH_RETRY = 0.1  # an attach that failed (EBUSY: `ip tuntap add` still holds it) retries
REATTACH_TRIES = 50
# Errors from the TAP fd that may mean the interface is gone (EBADFD: the fd was detached).
GONE_ERRNOS = (errno.EBADFD, errno.ENODEV, errno.EIO)

def tun_offload_flags(features: int) -> int:
    """Guest receive offloads -> TUNSETOFFLOAD flags (what the kernel may hand the TAP reader)."""

    def has(n: int) -> bool:
        return bool(features >> n & 1)

    if not has(VIRTIO_NET_F_GUEST_CSUM):
        return 0  # every segmentation offload builds on a partial checksum
    flags = TUN_F_CSUM
    if has(VIRTIO_NET_F_GUEST_TSO4):
        flags |= TUN_F_TSO4
    if has(VIRTIO_NET_F_GUEST_TSO6):
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and has(VIRTIO_NET_F_GUEST_ECN):
        flags |= TUN_F_TSO_ECN
    if has(VIRTIO_NET_F_GUEST_UFO):
        flags |= TUN_F_UFO
    return flags


class TapInterface:
    """One TAP interface, attached or created, with link monitoring."""

    offloads = True  # checksum and segmentation offloads pass through

    def __init__(self, cfg: TapBackend, guest: str, device_id: str, mtu: int, log: Any,
                 on_fd: Callable[[bool], None] | None = None) -> None:
        self.cfg = cfg
        self.ifname = cfg.ifname or default_ifname(guest, device_id)
        self.mtu = mtu
        self.log = log
        self.fd = -1
        self.link_up = False
        self.created = False
        self._offload_flags = 0
        self._hdr_len = 12
        self._ifindex = -1  # of the interface the fd is attached to
        self._on_fd = on_fd  # False: the fd is about to close; True: a new fd is attached
        self._timer: asyncio.TimerHandle | None = None
        self._tries = 0
        self._ctl: IfControl | None = None
        self._nl: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_link: Callable[[bool], None] | None = None
        # Frames that overrun the guest's buffers land here, so truncation is seen (a TAP read
        # returns at most the iovec's size and silently drops the rest).
        self._overflow = bytearray(MAX_FRAME_WITH_HDR + 4096)
        self._overflow_view = memoryview(self._overflow)

    def describe(self) -> dict[str, Any]:
        return {"backend": "tap", "ifname": self.ifname, "bridge": self.cfg.bridge}

    # -- lifecycle ------------------------------------------------------------------------------
    def open(self, loop: asyncio.AbstractEventLoop, on_link: Callable[[bool], None]) -> None:
        name = self.ifname
        if not IFNAME_RE.match(name):
            raise BackendError(f"TAP name {name!r} is not a valid interface name (1-15 of "
                               "letters, digits, '_', '.', '-')")
        existed = interface_exists(name)
        if not existed and not self.cfg.create:
            raise BackendError(f"TAP interface {name} does not exist and create is false: "
                               f"create it (ip tuntap add {name} mode tap) or set create: true")
        self._loop = loop
        self._on_link = on_link
        try:
            self._ctl = IfControl()
            self._attach()
            self._nl = link_monitor()
        except BackendError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise BackendError(f"TAP {name}: set-up failed: {exc.strerror or exc}") from None
        loop.add_reader(self._nl.fileno(), self._on_netlink)
        self.link_up = self._query_link()
        self.log.info("net_backend_opened", ifname=name, created=self.created,
                      bridge=self.cfg.bridge, link_up=self.link_up)

    def _attach(self) -> None:
        """Open /dev/net/tun on our name (creating the TAP if the name is free) and set it up."""
        name = self.ifname
        existed = interface_exists(name)
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BackendError(f"{TUN_PATH} is missing: load the tun module (modprobe tun)")
        except PermissionError:
            raise BackendError(f"{TUN_PATH}: permission denied (needs root or CAP_NET_ADMIN)")
        try:
            ifr = IFREQ_FLAGS.pack(name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            why = {errno.EPERM: "not permitted (needs CAP_NET_ADMIN, or be the TAP's owner)",
                   errno.EBUSY: "already in use by another process",
                   errno.EINVAL: "exists and is not a TAP interface (or a multiqueue one)"}
            raise BackendError(f"TAP {name}: {why.get(exc.errno or 0, exc.strerror)}") from None
        self.fd = fd
        self.created = not existed
        self._ifindex = socket.if_nametoindex(name)
        # Header size and offloads belong to the interface: a new one needs them again.
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", self._hdr_len))
        fcntl.ioctl(fd, TUNSETOFFLOAD, self._offload_flags)
        self._set_mtu()
        if self.cfg.bridge:
            self._enslave(self.cfg.bridge)
        if self.created or self.cfg.bridge:
            assert self._ctl is not None
            self._ctl.set_flags(name, IFF_UP, IFF_UP)

    def _close_fd(self) -> None:
        if self._on_fd is not None:
            self._on_fd(False)  # the device removes its reader/writer before the fd closes
        os.close(self.fd)
        self.fd = -1
        self._ifindex = -1

    def _detach(self, reason: str) -> None:
        """The TAP is gone: let go of its fd, report the link down, wait for it to return."""
        if self.fd < 0:
            return
        self._close_fd()
        self.log.warning("net_tap_lost", ifname=self.ifname, reason=reason)
        self._set_link(False)
        self._tries = 0
        if self.cfg.create:
            self._schedule(RECREATE_DELAY, True)

    def _schedule(self, delay: float, create: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, self._reattach, create) \
            if self._loop is not None else None

    def _reattach(self, create: bool) -> None:
        """Attach to the interface of our name again (creating it only when `create`)."""
        if self._timer is not None:
            self._timer.cancel()  # an attach now supersedes the one planned
            self._timer = None
        if self.fd >= 0 or self._nl is None or (not create and not interface_exists(self.ifname)):
            return  # attached already, closed, or nothing to attach to yet
        try:
            self._attach()
        except (BackendError, OSError) as exc:
            if self.fd >= 0:
                self._close_fd()
            self._tries += 1
            self.log.warning("net_tap_reattach_failed", ifname=self.ifname, error=str(exc),
                             attempt=self._tries)
            if self._tries < REATTACH_TRIES:
                self._schedule(REATTACH_RETRY, create)
            return
        self._tries = 0
        self.log.info("net_tap_reattached", ifname=self.ifname, created=self.created)
        if self._on_fd is not None:
            self._on_fd(True)
        self._set_link(self._query_link())

    def _fd_error(self, exc: OSError) -> None:
        """An error from the TAP fd: if the interface is gone, let go of it."""
        if exc.errno not in GONE_ERRNOS or self.fd < 0:
            return
        try:
            same = socket.if_nametoindex(self.ifname) == self._ifindex
        except OSError:
            same = False
        # EIO also means "set down" (a write then): only a detached fd or a gone name is loss.
        if exc.errno == errno.EBADFD or not same:
            self._detach(f"fd_{errno.errorcode.get(exc.errno or 0, exc.errno)}".lower())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._nl is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._nl.fileno())
            self._nl.close()
            self._nl = None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self.fd >= 0:
            os.close(self.fd)  # a TAP we created (not persistent) disappears with its last fd
            self.fd = -1
        self._ifindex = -1
        self.link_up = False

    # -- interface set-up -----------------------------------------------------------------------
    def _set_mtu(self) -> None:
        assert self._ctl is not None
        cur = self._ctl.mtu(self.ifname)
        if cur == self.mtu:
            return
        try:
            self._ctl.set_mtu(self.ifname, self.mtu)
        except OSError as exc:
            # The guest is told `mtu` through the MTU feature; a mismatch is the operator's to fix.
            self.log.warning("net_tap_mtu_mismatch", ifname=self.ifname, tap_mtu=cur,
                             guest_mtu=self.mtu, error=exc.strerror)

    def _enslave(self, bridge: str) -> None:
        master = f"/sys/class/net/{self.ifname}/master"
        try:
            if os.path.basename(os.readlink(master)) == bridge:
                return  # already a port of this bridge (an attached, pre-wired TAP)
        except OSError:
            pass
        if not interface_exists(bridge):
            raise BackendError(f"TAP {self.ifname}: bridge {bridge} does not exist")
        ifindex = socket.if_nametoindex(self.ifname)
        assert self._ctl is not None
        try:
            self._ctl.add_to_bridge(bridge, ifindex)
        except OSError as exc:
            raise BackendError(f"TAP {self.ifname}: cannot add to bridge {bridge}: "
                               f"{exc.strerror}") from None

    # -- link state -----------------------------------------------------------------------------
    def _query_link(self) -> bool:
        return self._ctl is not None and self._ctl.link_up(self.ifname)

    def _set_link(self, up: bool) -> None:
        if up != self.link_up:
            self.link_up = up
            self.log.info("net_link_changed", ifname=self.ifname, link_up=up)
            if self._on_link is not None:
                self._on_link(up)

    def _on_netlink(self) -> None:
        assert self._nl is not None
        indexes, lost = read_link_changes(self._nl)
        if not indexes and not lost:
            return
        try:
            ifindex = socket.if_nametoindex(self.ifname)
        except OSError:
            ifindex = -1
        if self.fd >= 0 and ifindex != self._ifindex:
            self._detach("interface_deleted")  # gone, or deleted and made again already
        if self.fd < 0:
            if ifindex >= 0:
                self._reattach(False)  # an interface of our name (re)appeared
            elif self.cfg.create and self._timer is None:
                self._schedule(RECREATE_DELAY, True)
            return
        if lost or self._ifindex in indexes:
            self._set_link(self._query_link())

    # -- data path ------------------------------------------------------------------------------
    def configure(self, hdr_len: int, features: int) -> None:
        """Header size and receive offloads for what the guest negotiated (at DRIVER_OK)."""
        self._hdr_len = hdr_len
        flags = tun_offload_flags(features)
        if self.fd < 0:  # detached: applied when the TAP is attached again
            self._offload_flags = flags
            return
        fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", hdr_len))
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        if self._offload_flags & ~flags:
            # Frames already queued were built for the offloads in force then (a GSO frame, a
            # partial checksum): a guest that no longer takes them must not see them.
            self.discard_queued()
        self._offload_flags = flags

    def discard_queued(self) -> int:
        """Drop the frames the kernel queued for this TAP (bounded by its queue length)."""
        n = 0
        while n < 1 << 16:
            try:
                os.readv(self.fd, [self._overflow_view])
            except OSError:
                break
            n += 1
        return n

    def recv(self, iov: list[memoryview], cap: int, hdr_len: int) -> int:
        """Read one frame (with its header, in place) into `iov` of `cap` bytes.

        Returns its length; more than `cap` means it did not fit (and is gone).
        Raises BlockingIOError when nothing is queued.
        """
        iov.append(self._overflow_view)
        try:
            return os.readv(self.fd, iov)
        except OSError as exc:
            self._fd_error(exc)  # EAGAIN is no loss: it returns at once
            raise
        finally:
            iov.pop()

    def send(self, views: list[memoryview], hdr_len: int) -> bool:
        """Write one frame (header included) from guest memory. False: no peer (never, here)."""
        try:
            os.writev(self.fd, views)
        except OSError as exc:
            self._fd_error(exc)  # EAGAIN is no loss: it returns at once
            raise
        return True
