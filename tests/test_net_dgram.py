"""virtio-net through the datagram backend: two guests (driver models) wired by sockets.

No root needed. Each guest has its own memfd guest memory, its queues laid out by the split
ring driver model and a NetDevice activated directly (no register window).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vmmiod.config import DgramBackend, GuestConfig, MmioConfig, NetConfig, SocketAddress
from vmmiod.devices.net import NetDevice
from vmmiod.devices.net_ctrl import (
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
)
from vmmiod.devices.net_proto import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    default_mac,
)
from vmmiod.memory import memfd_memory
from vmmiod.sim.net_model import NetDriver, NetHdr, mac_table
from vmmiod.sim.net_testkit import ETH_P_IP, ether
from vmmiod.sim.vring import Allocator

MEM_SIZE = 16 << 20
GPA = 0x4000_0000


class Guest:
    """One guest: memory, a NetDevice and its driver model."""

    def __init__(self, name: str, backend: DgramBackend, **driver_kw: Any) -> None:
        self.memory, self.fd = memfd_memory(MEM_SIZE, GPA)
        self.alloc = Allocator(GPA, MEM_SIZE)
        cfg = NetConfig(id="net0", mmio=MmioConfig(base=0x1000, irq=5), backend=backend,
                        queue_size=64)
        self.device = NetDevice(cfg, GuestConfig(name=name))
        self.driver_kw = driver_kw
        self.driver: NetDriver

    async def start(self) -> None:
        await self.device.open()
        self.driver = NetDriver(self.device, self.memory, self.alloc, queue_size=64,
                                **self.driver_kw)

    async def stop(self) -> None:
        self.device.reset()
        await self.device.close()
        os.close(self.fd)

    @property
    def mac(self) -> bytes:
        return self.device.mac


def unix_pair(tmp: Path) -> tuple[DgramBackend, DgramBackend]:
    a, b = tmp / "a.sock", tmp / "b.sock"
    return (DgramBackend(local=SocketAddress("unix", path=a), remote=SocketAddress("unix", path=b)),
            DgramBackend(local=SocketAddress("unix", path=b), remote=SocketAddress("unix", path=a)))


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 30))


def frame_to(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return ether(dst, src, ETH_P_IP, payload)


def test_two_guests_exchange_frames_over_unix_sockets(tmp_path: Path) -> None:
    async def body() -> None:
        ba, bb = unix_pair(tmp_path)
        a, b = Guest("alpha", ba), Guest("beta", bb)
        await a.start()
        await b.start()
        try:
            a.driver.post_rx()
            b.driver.post_rx()
            sent_ab = [frame_to(b.mac, a.mac, os.urandom(40 + i * 97)) for i in range(15)]
            sent_ba = [frame_to(a.mac, b.mac, os.urandom(1500)) for _ in range(10)]
            for f in sent_ab:
                a.driver.send(f)
            for f in sent_ba:
                b.driver.send(f, split_at=5)  # header split over two descriptors
            got_b = await b.driver.recv(len(sent_ab))
            got_a = await a.driver.recv(len(sent_ba))
            assert [f for _h, f in got_b] == sent_ab
            assert [f for _h, f in got_a] == sent_ba
            # dgram carries no offloads: every received header is plain
            assert all(h.flags == 0 and h.gso_type == 0 for h, _f in got_a + got_b)
            await a.driver.flush_tx()
            assert a.driver.txq.pending() == 0
            assert a.device.counters["tx_frames"] == 15
            assert a.device.counters["tx_bytes"] == sum(len(f) for f in sent_ab)
            assert b.device.counters["rx_frames"] == 15
            assert b.device.counters["rx_bytes"] == sum(len(f) for f in sent_ab)
            assert b.device.counters["interrupts"] > 0
            assert a.driver.transport.faults == [] and b.driver.transport.faults == []
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_udp_learns_its_peer_and_merges_buffers() -> None:
    async def body() -> None:
        # a has no remote: it answers whoever spoke last; b's remote is a's bound port.
        a = Guest("alpha", DgramBackend(local=SocketAddress("udp", "127.0.0.1", 0)),
                  rx_buf_size=300)
        await a.start()
        port = a.device.backend.local_address[1]  # type: ignore[attr-defined]
        b = Guest("beta", DgramBackend(local=SocketAddress("udp", "127.0.0.1", 0),
                                       remote=SocketAddress("udp", "127.0.0.1", port)))
        await b.start()
        try:
            assert a.driver.mrg
            a.driver.post_rx()
            b.driver.post_rx()
            first = frame_to(a.mac, b.mac, b"hello" * 200)  # 1014 bytes: 4 buffers of 300
            a.driver.send(frame_to(b.mac, a.mac, b"early"))  # no peer yet: dropped, returned
            await a.driver.flush_tx()
            assert a.device.counters["tx_dropped_no_peer"] == 1
            b.driver.send(first)
            (hdr, got), = await a.driver.recv(1)
            assert got == first and hdr.num_buffers == 4
            reply = frame_to(b.mac, a.mac, b"world" * 3)
            a.driver.send(reply)
            (_h, back), = await b.driver.recv(1)
            assert back == reply
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_frame_too_big_for_posted_buffer_is_dropped(tmp_path: Path) -> None:
    async def body() -> None:
        ba, bb = unix_pair(tmp_path)
        a = Guest("alpha", ba)
        # No MRG_RXBUF: each frame must fit one 200-byte buffer.
        b = Guest("beta", bb, want=~(1 << VIRTIO_NET_F_MRG_RXBUF), rx_buf_size=200)
        await a.start()
        await b.start()
        try:
            b.driver.post_rx(4)
            big = frame_to(b.mac, a.mac, bytes(900))
            small = frame_to(b.mac, a.mac, b"fits")
            a.driver.send(big)
            a.driver.send(small)
            got = await b.driver.recv(1)
            assert [f for _h, f in got] == [small]
            assert b.device.counters["rx_dropped_too_big"] == 1
            assert b.device.counters["rx_frames"] == 1
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_transmit_drops_bad_frames_and_returns_every_chain(tmp_path: Path) -> None:
    async def body() -> None:
        ba, bb = unix_pair(tmp_path)
        a, b = Guest("alpha", ba), Guest("beta", bb)
        await a.start()
        await b.start()
        try:
            b.driver.post_rx()
            good = frame_to(b.mac, a.mac, b"ok")
            # NEEDS_CSUM without CSUM negotiated (dgram offers no offloads)
            a.driver.send(good, NetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=14,
                                       csum_offset=6))
            a.driver.send(good, NetHdr(flags=0x2))  # DATA_VALID is device-to-driver only
            a.driver.send(good, NetHdr(gso_type=1, gso_size=1000))  # TSO not negotiated
            a.driver.send(b"\x01\x02")  # runt: no Ethernet header
            a.driver.send(frame_to(b.mac, a.mac, bytes(65562)))  # larger than 65562 with header
            a.driver.send(good)
            await a.driver.flush_tx()
            assert a.driver.txq.pending() == 0  # every chain came back
            c = a.device.counters
            assert c["tx_dropped_bad_header"] == 4
            assert c["tx_dropped_too_big"] == 1
            assert c["tx_frames"] == 1
            got = await b.driver.recv(1)
            assert [f for _h, f in got] == [good]
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_rx_mode_and_mac_filter_commands(tmp_path: Path) -> None:
    async def body() -> None:
        ba, bb = unix_pair(tmp_path)
        a, b = Guest("alpha", ba), Guest("beta", bb)
        await a.start()
        await b.start()
        try:
            d = b.driver
            d.post_rx()
            other = bytes.fromhex("020000000099")
            mcast = bytes.fromhex("01005e000001")
            listed = bytes.fromhex("01005e0000fb")

            async def delivered(dst: bytes) -> bool:
                before = b.device.counters["rx_frames"]
                a.driver.send(frame_to(dst, a.mac, b"x" * 30))
                await d.recv(1, timeout=0.5)
                return b.device.counters["rx_frames"] > before

            assert await delivered(other)  # promiscuous until the driver says otherwise
            assert await d.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0") == 0
            assert not await delivered(other)
            assert await delivered(b.mac)
            assert await delivered(b"\xff" * 6)
            assert not await delivered(mcast)
            assert await d.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
                                   mac_table([other]) + mac_table([listed])) == VIRTIO_NET_OK
            assert await delivered(other)
            assert await delivered(listed)
            assert not await delivered(mcast)
            assert await d.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\1") == 0
            assert await delivered(mcast)
            assert b.device.counters["rx_dropped_filtered"] == 3
            # malformed: a table count larger than the data
            bad = (100).to_bytes(4, "little") + other
            assert await d.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
                                   bad) == VIRTIO_NET_ERR
            assert await d.command(9, 0) == VIRTIO_NET_ERR  # unknown class
            new = bytes.fromhex("02aabbccddee")
            assert await d.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET,
                                   new) == VIRTIO_NET_OK
            assert b.device.read_config(0, 6) == int.from_bytes(new, "little")
            assert b.device.counters["ctrl_errors"] == 2
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_features_config_space_and_default_mac(tmp_path: Path) -> None:
    async def body() -> None:
        ba, _bb = unix_pair(tmp_path)
        g = Guest("alpha", ba)
        f = g.device.device_features()
        for bit in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4):
            assert not f >> bit & 1  # dgram: no offloads
        assert f >> VIRTIO_NET_F_MRG_RXBUF & 1
        # dependency rules of 5.1.3.1 refuse inconsistent sets
        assert not g.device.validate_features(1 << VIRTIO_NET_F_GUEST_TSO4)
        assert g.device.validate_features((1 << VIRTIO_NET_F_GUEST_TSO4)
                                          | (1 << VIRTIO_NET_F_GUEST_CSUM))
        mac = g.device.mac
        assert mac == default_mac("alpha", "net0") and mac != default_mac("beta", "net0")
        assert mac[0] & 2 and not mac[0] & 1  # locally administered unicast
        assert g.device.read_config(6, 2) == 0  # link reads down until the backend is open
        await g.start()
        try:
            assert g.device.read_config(6, 2) == 1
            assert g.device.read_config(10, 2) == 1500
        finally:
            await g.stop()
    run(body)


def test_backpressure_end_to_end_without_loss(tmp_path: Path) -> None:
    async def body() -> None:
        ba, bb = unix_pair(tmp_path)
        a, b = Guest("alpha", ba), Guest("beta", bb)
        await a.start()
        await b.start()
        try:
            frames = [frame_to(b.mac, a.mac, i.to_bytes(4, "big") * 100) for i in range(600)]
            queued = 0
            # b posts no buffers, so its device must not read: b's socket queue fills, a's
            # sends would block, a's device waits for writability and its ring fills up.
            for _ in range(50):
                a.driver.reclaim_tx()
                while queued < len(frames) and a.driver.txq.num_free:
                    a.driver.send(frames[queued])
                    queued += 1
                await asyncio.sleep(0.01)
            assert b.device.counters["rx_frames"] == 0
            assert queued < len(frames)
            assert a.device.counters["tx_dropped_backend_error"] == 0
            assert a.driver.txq.num_free == 0  # the guest's ring is the only queue that grew
            b.driver.post_rx()
            got: list[bytes] = []
            for _ in range(400):
                a.driver.reclaim_tx()
                while queued < len(frames) and a.driver.txq.num_free:
                    a.driver.send(frames[queued])
                    queued += 1
                got += [f for _h, f in await b.driver.recv(1, timeout=0.05)]
                if len(got) == len(frames):
                    break
            assert got == frames  # every frame, in order, nothing dropped
            # a stranger's datagram (not the configured remote) is counted and dropped
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            raw.bind(str(tmp_path / "stranger.sock"))
            raw.sendto(frames[0], str(tmp_path / "b.sock"))
            raw.close()
            assert await b.driver.recv(1, timeout=0.3) == []
            assert b.device.counters["rx_dropped_foreign_sender"] == 1
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_hostile_receive_chain_and_ring_fault(tmp_path: Path) -> None:
    async def body() -> None:
        ba, bb = unix_pair(tmp_path)
        a, b = Guest("alpha", ba), Guest("beta", bb)
        await a.start()
        await b.start()
        try:
            d = b.driver
            buf = b.alloc.alloc(64)
            d.rxq.add([(buf, 16)], [(buf + 16, 48)], token=buf)  # a readable part: bad
            d.kick(0)
            d.post_rx(2)
            a.driver.send(frame_to(b.mac, a.mac, b"after"))
            got = await d.recv(1)
            assert [f[-5:] for _h, f in got] == [b"after"]
            assert b.device.counters["rx_dropped_bad_buffer"] == 1
            # transmit ring: avail.idx far ahead of what was posted -> device needs reset
            a.driver.txq.raw_avail_idx(1000)
            a.device.queue_notify(1)
            await asyncio.sleep(0.05)
            assert a.device.failed and a.driver.transport.faults
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_legacy_header_split_headers_and_long_scatter_lists(tmp_path: Path) -> None:
    async def body() -> None:
        ba, bb = unix_pair(tmp_path)
        # a: a legacy driver (no VERSION_1, no MRG_RXBUF): 10-byte headers both ways
        a = Guest("alpha", ba, want=~((1 << 32) | (1 << VIRTIO_NET_F_MRG_RXBUF)))
        b = Guest("beta", bb, indirect=True)
        await a.start()
        await b.start()
        try:
            assert a.driver.hdr_len == 10 and a.device.hdr_len == 10
            a.driver.post_rx()
            # b posts receive chains whose 12-byte header is split 4 + rest
            for _ in range(4):
                gpa = b.alloc.alloc(2048)
                b.driver.rxq.add([], [(gpa, 4), (gpa + 4, 2044)], token=gpa)
            b.driver.kick(0)
            f1 = frame_to(b.mac, a.mac, os.urandom(300))
            a.driver.send(f1)
            (h, got), = await b.driver.recv(1, repost=False)
            assert got == f1 and h.num_buffers == 1
            # b sends a frame as 1100 one-byte descriptors (indirect): more than an iovec holds
            f2 = frame_to(a.mac, b.mac, os.urandom(1100 - 14))
            data = bytes(12) + f2
            gpa = b.alloc.alloc(len(data))
            b.memory.write(gpa, data)
            b.driver.txq.add([(gpa, 12)] + [(gpa + 12 + i, 1) for i in range(len(f2))], [],
                             token=None, indirect=True)
            b.driver.kick(1)
            (_h, back), = await a.driver.recv(1)
            assert back == f2
        finally:
            await a.stop()
            await b.stop()
    run(body)


def test_device_without_backend_drops_and_returns(tmp_path: Path) -> None:
    async def body() -> None:
        ba, _bb = unix_pair(tmp_path)
        g = Guest("alpha", ba)
        # activated but never opened (backend refused at start-up): link down, nothing read
        g.driver = NetDriver(g.device, g.memory, g.alloc, queue_size=64)
        g.driver.post_rx()
        g.driver.send(frame_to(b"\xff" * 6, g.mac, b"into the void"))
        await g.driver.flush_tx()
        assert g.driver.txq.pending() == 0
        assert g.device.counters["tx_dropped_link_down"] == 1
        assert g.device.read_config(6, 2) == 0 and not g.device.rx.reading
        g.device.reset()
        os.close(g.fd)
    run(body)
