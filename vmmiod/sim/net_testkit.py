"""Test and benchmark kit for virtio-net: a network namespace runner and the few packets a
guest needs (Ethernet, ARP, IPv4, ICMP echo, UDP, TCP headers). Never imported by the daemon.

`NetNamespace` creates a named namespace with `ip netns add` and removes it on exit;
`run_in_netns()` runs a function in a fresh thread that setns(2)-es into it (network
namespaces are per thread), so the TAP, its control sockets and every host-side socket the
function opens live inside and vanish with it, while the rest of the process is untouched.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from typing import Any, Self, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17


class NetNamespace:
    """A throw-away network namespace (needs root)."""

    _seq = 0

    def __init__(self, prefix: str = "vmmiod-t") -> None:
        NetNamespace._seq += 1
        self.name = f"{prefix}{os.getpid()}-{NetNamespace._seq}"

    def __enter__(self) -> Self:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.ip("link", "set", "lo", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

    def ip(self, *args: str, check: bool = True) -> str:
        """Run `ip -n <ns> ...` and return its output."""
        r = subprocess.run(["ip", "-n", self.name, *args], check=False, capture_output=True,
                           text=True)
        if check and r.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return run_in_netns(self.name, fn, *args)


def run_in_netns(name: str, fn: Callable[..., T], *args: Any) -> T:
    """Run fn(*args) in a new thread inside network namespace `name`; return or re-raise."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            error.append(exc)

    t = threading.Thread(target=body, name=f"netns-{name}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


# -- checksums -----------------------------------------------------------------------------------
def ones_sum(data: bytes, start: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_checksum(data: bytes, start: int = 0) -> int:
    return ~ones_sum(data, start) & 0xFFFF


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    return ones_sum(src + dst + struct.pack("!BBH", 0, proto, length))


# -- frames ----------------------------------------------------------------------------------------
def mac_bytes(text: str) -> bytes:
    return bytes(int(p, 16) for p in text.split(":"))


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, src_mac,
                       socket.inet_aton(src_ip), b"\0" * 6, socket.inet_aton(target_ip))
    return ether(b"\xff" * 6, src_mac, ETH_P_ARP, body)


def parse_arp(frame: bytes) -> dict[str, Any] | None:
    if len(frame) < 42 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_ARP:
        return None
    _ht, _pt, _hl, _pl, op, sha, spa, tha, tpa = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
    return {"op": op, "sender_mac": sha, "sender_ip": socket.inet_ntoa(spa),
            "target_mac": tha, "target_ip": socket.inet_ntoa(tpa)}


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
    return hdr + payload


def icmp_echo(ident: int, seq: int, data: bytes, reply: bool = False) -> bytes:
    msg = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + data
    return msg[:2] + struct.pack("!H", inet_checksum(msg)) + msg[4:]


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes,
        partial: bool = False) -> bytes:
    """A UDP datagram; `partial`: checksum field holds only the pseudo-header sum, as a
    driver leaves it for VIRTIO_NET_HDR_F_NEEDS_CSUM."""
    length = 8 + len(payload)
    ps = pseudo_sum(socket.inet_aton(src), socket.inet_aton(dst), IPPROTO_UDP, length)
    hdr = struct.pack("!HHHH", sport, dport, length, 0)
    if partial:
        csum = ps
    else:
        csum = inet_checksum(hdr + payload, ps) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, csum) + payload


def tcp_segment(src: str, dst: str, sport: int, dport: int, seq: int, payload: bytes) -> bytes:
    """A TCP PSH/ACK segment with a partial checksum (for TSO: the device side finishes it)."""
    length = 20 + len(payload)
    ps = pseudo_sum(socket.inet_aton(src), socket.inet_aton(dst), IPPROTO_TCP, length)
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 1, 5 << 4, 0x18, 65535, ps, 0) + payload


def parse_ipv4(frame: bytes) -> dict[str, Any] | None:
    if len(frame) < 34 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ihl = (frame[14] & 0xF) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    return {"proto": frame[23], "src": socket.inet_ntoa(frame[26:30]),
            "dst": socket.inet_ntoa(frame[30:34]), "header": frame[14:14 + ihl],
            "payload": frame[14 + ihl:14 + total]}


def complete_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """What a driver does for a received VIRTIO_NET_HDR_F_NEEDS_CSUM frame."""
    pos = csum_start + csum_offset
    csum = inet_checksum(frame[csum_start:])
    return frame[:pos] + struct.pack("!H", csum) + frame[pos + 2:]
