"""virtio-net on a real TAP, inside a network namespace each test creates (root only).

The device, its TAP and every host-side socket live in a thread that setns(2)-ed into the
namespace (vmmiod.sim.net_testkit); the host side is the real Linux stack: it answers the
guest's ARP and ping, verifies checksums, segments nothing we did not ask for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import struct
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from vmmiod.config import GuestConfig, MmioConfig, NetConfig, TapBackend
from vmmiod.devices.base import BackendError
from vmmiod.devices.net import NetDevice
from vmmiod.devices.net_proto import (
    GUEST_OFFLOAD_MASK,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
)
from vmmiod.memory import memfd_memory
from vmmiod.sim.net_model import NetDriver, NetHdr
from vmmiod.sim.net_testkit import (
    ETH_P_IP,
    IPPROTO_ICMP,
    IPPROTO_UDP,
    NetNamespace,
    arp_request,
    complete_checksum,
    ether,
    icmp_echo,
    inet_checksum,
    ipv4,
    mac_bytes,
    parse_arp,
    parse_ipv4,
    pseudo_sum,
    tcp_segment,
    udp,
)
from vmmiod.sim.vring import Allocator

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and a TAP"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
]

HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"
TAP = "vtap0"
MEM_SIZE = 32 << 20
GPA = 0x4000_0000
SOL_PACKET, PACKET_VNET_HDR = 263, 15


class TapGuest:
    def __init__(self, ns: NetNamespace, backend: TapBackend | None = None,
                 **driver_kw: Any) -> None:
        self.ns = ns
        self.memory, self.fd = memfd_memory(MEM_SIZE, GPA)
        self.alloc = Allocator(GPA, MEM_SIZE)
        cfg = NetConfig(id="net0", mmio=MmioConfig(base=0x1000, irq=5),
                        backend=backend or TapBackend(ifname=TAP))
        self.device = NetDevice(cfg, GuestConfig(name="tapguest"))
        self.driver_kw = driver_kw
        self.driver: NetDriver

    async def start(self, configure_host: bool = True) -> None:
        await self.device.open()
        if configure_host:
            self.ns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
            self.ns.ip("neigh", "replace", GUEST_IP, "lladdr", self.mac_text, "dev", TAP,
                       "nud", "permanent")
        self.driver = NetDriver(self.device, self.memory, self.alloc, **self.driver_kw)
        self.driver.post_rx()

    async def stop(self) -> None:
        self.device.reset()
        await self.device.close()
        os.close(self.fd)

    @property
    def mac_text(self) -> str:
        return ":".join(f"{b:02x}" for b in self.device.mac)

    def host_mac(self) -> bytes:
        info = json.loads(self.ns.ip("-j", "link", "show", TAP))[0]
        return mac_bytes(info["address"])

    async def expect(self, pred: Callable[[NetHdr, bytes], bool],
                     timeout: float = 3.0) -> tuple[NetHdr, bytes]:
        """The first received frame matching `pred` (others, e.g. IPv6 chatter, skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for hdr, frame in await self.driver.recv(1, timeout=0.1):
                if pred(hdr, frame):
                    return hdr, frame
        raise AssertionError("expected frame not received")


def in_netns(body: Callable[[NetNamespace], Awaitable[None]]) -> None:
    with NetNamespace() as ns:
        ns.run(lambda: asyncio.run(asyncio.wait_for(body(ns), 60)))


def ip_frame(g: TapGuest, proto: int, payload: bytes) -> bytes:
    return ether(g.host_mac(), g.device.mac, ETH_P_IP, ipv4(GUEST_IP, HOST_IP, proto, payload))


def udp_ok(frame: bytes) -> bool:
    ip = parse_ipv4(frame)
    assert ip is not None
    seg = ip["payload"]
    ps = pseudo_sum(socket.inet_aton(ip["src"]), socket.inet_aton(ip["dst"]), IPPROTO_UDP,
                    len(seg))
    return inet_checksum(seg, ps) == 0 and inet_checksum(ip["header"]) == 0


def test_arp_and_ping_get_the_kernels_replies() -> None:
    async def body(ns: NetNamespace) -> None:
        g = TapGuest(ns)
        await g.start()
        try:
            host_mac = g.host_mac()
            g.driver.send(arp_request(g.device.mac, GUEST_IP, HOST_IP))
            _h, reply = await g.expect(lambda h, f: (parse_arp(f) or {}).get("op") == 2)
            arp = parse_arp(reply)
            assert arp is not None
            assert arp["sender_ip"] == HOST_IP and arp["sender_mac"] == host_mac
            assert arp["target_mac"] == g.device.mac and reply[:6] == g.device.mac
            for seq in range(1, 4):
                data = os.urandom(56)
                g.driver.send(ip_frame(g, IPPROTO_ICMP, icmp_echo(0x1234, seq, data)))
                _h, f = await g.expect(lambda h, f: (parse_ipv4(f) or {}).get("proto") == 1)
                ip = parse_ipv4(f)
                assert ip is not None and ip["src"] == HOST_IP and ip["dst"] == GUEST_IP
                msg = ip["payload"]
                assert msg == icmp_echo(0x1234, seq, data, reply=True)
                assert inet_checksum(msg) == 0
            assert g.device.counters["tx_frames"] == 4
            assert g.driver.transport.faults == []
            # The cost counters per queue: each frame sent after the device went idle was a
            # kick and a transmit run, which then read the backend at once.
            stats = g.device.stats()
            assert stats["notifications_q1"] == stats["runs_q1"] == stats["rx_after_tx"] == 4
            assert stats["notifications_q2"] == stats["runs_q2"] == 0
            assert stats["interrupts_q0"] >= 4 and stats["interrupts_q1"] == 4
            # The kernel answers inside the TAP write, so each reply left with its request's
            # interrupt: 4 in all (one more per frame that arrived on its own), not 4 + 4.
            assert 4 <= stats["interrupts"] <= 4 + stats["rx_wakeups"] and stats["interrupts"] < 8
        finally:
            await g.stop()
    in_netns(body)


def test_udp_both_ways_with_checksums() -> None:
    async def body(ns: NetNamespace) -> None:
        g = TapGuest(ns)
        await g.start()
        host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        host.bind((HOST_IP, 5000))
        host.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            sent = [os.urandom(n) for n in (1, 100, 1000, 1472)]
            for p in sent:
                g.driver.send(ip_frame(g, IPPROTO_UDP, udp(GUEST_IP, HOST_IP, 4000, 5000, p)))
            got = [await asyncio.wait_for(loop.sock_recvfrom(host, 65536), 3) for _ in sent]
            assert [hashlib.sha256(d).digest() for d, _a in got] == \
                   [hashlib.sha256(p).digest() for p in sent]
            assert {a for _d, a in got} == {(GUEST_IP, 4000)}
            partial = 0
            for p in sent:
                host.sendto(p, (GUEST_IP, 4000))
                hdr, f = await g.expect(
                    lambda h, f: (parse_ipv4(f) or {}).get("proto") == IPPROTO_UDP)
                if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                    partial += 1  # GUEST_CSUM: the kernel left the checksum to us
                    f = complete_checksum(f, hdr.csum_start, hdr.csum_offset)
                assert udp_ok(f)
                ip = parse_ipv4(f)
                assert ip is not None and ip["payload"][8:] == p
            assert partial == len(sent)  # TUNSETOFFLOAD took effect
        finally:
            host.close()
            await g.stop()
    in_netns(body)


def test_without_guest_offloads_the_kernel_sends_full_checksums() -> None:
    async def body(ns: NetNamespace) -> None:
        g = TapGuest(ns, want=~GUEST_OFFLOAD_MASK)
        await g.start()
        host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            host.sendto(b"full checksum please", (GUEST_IP, 4000))
            hdr, f = await g.expect(
                lambda h, f: (parse_ipv4(f) or {}).get("proto") == IPPROTO_UDP)
            assert hdr.flags == 0 and udp_ok(f)
        finally:
            host.close()
            await g.stop()
    in_netns(body)


def udp_csum_errors() -> int:
    with open("/proc/thread-self/net/snmp") as fh:
        rows = [line.split() for line in fh if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("InCsumErrors")])


def test_checksum_offload_is_completed_by_the_host_kernel() -> None:
    async def body(ns: NetNamespace) -> None:
        g = TapGuest(ns)
        await g.start()
        host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        host.bind((HOST_IP, 5001))
        host.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            payload = os.urandom(700)
            frame = ip_frame(g, IPPROTO_UDP, udp(GUEST_IP, HOST_IP, 4001, 5001, payload,
                                                 partial=True))
            needs = NetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
            g.driver.send(frame, needs)
            data, _a = await asyncio.wait_for(loop.sock_recvfrom(host, 65536), 3)
            assert data == payload
            # The same bytes without NEEDS_CSUM carry a wrong checksum: the kernel drops them.
            before = udp_csum_errors()
            g.driver.send(frame)
            await g.driver.flush_tx()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(loop.sock_recvfrom(host, 65536), 0.3)
            assert udp_csum_errors() == before + 1
        finally:
            host.close()
            await g.stop()
    in_netns(body)


def test_tso_frame_reaches_the_host_unsegmented() -> None:
    async def body(ns: NetNamespace) -> None:
        g = TapGuest(ns)
        await g.start()
        tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        tap.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        tap.bind((TAP, ETH_P_IP))
        tap.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            data = os.urandom(60000)
            seg = tcp_segment(GUEST_IP, HOST_IP, 4002, 5002, 1, data)
            frame = ip_frame(g, 6, seg)
            g.driver.send(frame, NetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                        gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
                                        gso_size=1448, csum_start=34, csum_offset=16))
            while True:
                got = await asyncio.wait_for(loop.sock_recv(tap, 70000), 3)
                _flags, gso_type, _hl, gso_size = struct.unpack_from("<BBHH", got)
                if got[10:][14 + 20 + 20:] == data:
                    break
            assert gso_type == VIRTIO_NET_HDR_GSO_TCPV4 and gso_size == 1448
            assert g.device.counters["tx_bytes"] == len(frame)
        finally:
            tap.close()
            await g.stop()
    in_netns(body)


def tap_tx_dropped(ns: NetNamespace) -> int:
    info = json.loads(ns.ip("-j", "-s", "link", "show", TAP))[0]
    return int(info["stats64"]["tx"]["dropped"])


def test_flood_waits_in_the_kernel_until_buffers_come() -> None:
    async def body(ns: NetNamespace) -> None:
        g = TapGuest(ns)
        await g.device.open()
        # The guest negotiates and activates but posts no receive buffer yet.
        g.driver = NetDriver(g.device, g.memory, g.alloc, queue_size=256)
        pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        pkt.bind((TAP, 0))
        try:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            frame = ether(g.device.mac, b"\x02" * 6, 0x88B5, bytes(1000))  # local experimental
            for _ in range(3000):
                pkt.send(frame)
            await asyncio.sleep(0.2)
            grown = tracemalloc.get_traced_memory()[0] - base
            tracemalloc.stop()
            assert g.device.counters["rx_frames"] == 0 and not g.device.rx.reading
            assert grown < 1 << 20  # the daemon kept none of it
            assert tap_tx_dropped(ns) > 0  # the kernel's bounded TAP queue overflowed
            marker = ether(g.device.mac, b"\x02" * 6, 0x88B5, b"marker" + bytes(60))
            g.driver.post_rx()
            seen = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            sent_marker = False
            while loop.time() < deadline:
                frames = await g.driver.recv(1, timeout=0.1)
                seen += len(frames)
                if any(f == marker for _h, f in frames):
                    break
                if not frames and not sent_marker:
                    pkt.send(marker)
                    sent_marker = True
            else:
                raise AssertionError("delivery did not resume")
            assert seen > 256  # queued frames came through, more than one ring's worth
        finally:
            pkt.close()
            await g.stop()
    in_netns(body)


def test_link_down_and_up_reach_the_guest() -> None:
    async def body(ns: NetNamespace) -> None:
        g = TapGuest(ns)
        await g.start()
        t = g.driver.transport
        try:
            assert g.driver.has(VIRTIO_NET_F_STATUS)
            assert g.device.read_config(6, 2) == 1
            ns.ip("link", "set", TAP, "down")
            for _ in range(50):
                if t.config_changes:
                    break
                await t.wait(0.05)
            assert t.config_changes == 1 and g.device.read_config(6, 2) == 0
            g.driver.send(arp_request(g.device.mac, GUEST_IP, HOST_IP))
            await g.driver.flush_tx()
            assert g.device.counters["tx_dropped_link_down"] == 1
            ns.ip("link", "set", TAP, "up")
            for _ in range(50):
                if t.config_changes == 2:
                    break
                await t.wait(0.05)
            assert t.config_changes == 2 and g.device.read_config(6, 2) == 1
            # the operator deletes the interface under the daemon: link loss, nothing worse
            ns.ip("link", "del", TAP)
            for _ in range(50):
                if t.config_changes == 3:
                    break
                await t.wait(0.05)
            assert t.config_changes == 3 and g.device.read_config(6, 2) == 0
            g.driver.send(arp_request(g.device.mac, GUEST_IP, HOST_IP))
            await g.driver.flush_tx()
            assert g.device.counters["tx_dropped_link_down"] == 2
            assert t.faults == [] and not g.device.failed
        finally:
            await g.stop()
    in_netns(body)


def test_bridge_attach_existing_and_open_errors() -> None:
    async def body(ns: NetNamespace) -> None:
        ns.ip("link", "add", "br0", "type", "bridge")
        g = TapGuest(ns, TapBackend(ifname=TAP, bridge="br0"))
        await g.device.open()
        info = json.loads(ns.ip("-j", "link", "show", TAP))[0]
        assert info["master"] == "br0" and "UP" in info["flags"]
        await g.device.close()
        # an interface the operator made, attached by name; create: false
        ns.ip("tuntap", "add", "optap", "mode", "tap")
        h = TapGuest(ns, TapBackend(ifname="optap", create=False))
        await h.device.open()
        assert not h.device.backend.created  # type: ignore[attr-defined]
        await h.device.close()
        assert "optap" in ns.ip("link", "show")  # persistent: still there
        for backend, words in ((TapBackend(ifname="absent0", create=False), "does not exist"),
                               (TapBackend(ifname="x" * 16), "not a valid"),
                               (TapBackend(ifname="lo"), "not a TAP"),
                               (TapBackend(ifname="vtap9", bridge="nobr"), "bridge nobr")):
            bad = TapGuest(ns, backend)
            with pytest.raises(BackendError, match=words):
                await bad.device.open()
            os.close(bad.fd)
        assert "vtap9" not in ns.ip("link", "show")  # a failed open leaves nothing behind
    in_netns(body)


def test_guest_offloads_switch_at_run_time_and_after_reset() -> None:
    async def body(ns: NetNamespace) -> None:
        g = TapGuest(ns)
        await g.start()
        host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

        def is_udp(h: NetHdr, f: bytes) -> bool:
            return (parse_ipv4(f) or {}).get("proto") == IPPROTO_UDP
        try:
            host.sendto(b"offloaded", (GUEST_IP, 4000))
            hdr, f = await g.expect(is_udp)
            assert hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
            # VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET 0: the kernel must checksum for us again
            ack = await g.driver.command(5, 0, (0).to_bytes(8, "little"))
            assert ack == 0
            host.sendto(b"full", (GUEST_IP, 4000))
            hdr, f = await g.expect(is_udp)
            assert hdr.flags == 0 and udp_ok(f)
            assert await g.driver.command(5, 0, (1 << 40).to_bytes(8, "little")) == 1
            assert await g.driver.command(5, 0, (2).to_bytes(8, "little")) == 0  # GUEST_CSUM
            # Frames queued for a driver that took offloads are not shown to the next one,
            # which takes none: the reset turns them off and the new activation drops them.
            g.driver.rx_frames()  # take back everything; post nothing more: the ring runs dry
            for i in range(g.driver.rxq.size + 50):
                host.sendto(b"queued %d" % i, (GUEST_IP, 4000))
            await asyncio.sleep(0.2)
            assert g.device.rx.held.cap == 0 and not g.device.rx.reading  # ring exhausted
            g.device.reset()
            g.driver = NetDriver(g.device, g.memory, g.alloc, want=~GUEST_OFFLOAD_MASK)
            g.driver.post_rx()
            late = await g.driver.recv(1, timeout=0.3)
            assert not [f for _h, f in late if b"queued" in f]
            host.sendto(b"fresh", (GUEST_IP, 4000))
            hdr, f = await g.expect(is_udp)
            assert hdr.flags == 0 and udp_ok(f)
        finally:
            host.close()
            await g.stop()
    in_netns(body)
