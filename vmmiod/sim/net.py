"""Guest virtio-net driver (like Linux's virtio_net.c in "small buffers" mode) and its workload.

Receive buffers are one descriptor of virtio_net_hdr_v1 (12 bytes) + 1518 bytes, as Linux's
add_recvbuf_small posts them; a transmitted frame is the header pushed in front of the frame in
one descriptor (VERSION_1 implies any layout, Linux's xmit_skb "can_push" case).
"""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from vmmiod.hypervisors.generic.protocol import Window
from vmmiod.sim.virtio_mmio import DeviceFailed, VirtioMmioDriver
from vmmiod.sim.vmm import SimError, SimVmm
from vmmiod.sim.vring import DriverQueue

VIRTIO_ID_NET = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
DRIVER_FEATURES = (1 << VIRTIO_NET_F_MTU) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
VIRTIO_NET_S_LINK_UP = 1
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = 12
GOOD_PACKET_LEN = 1518  # ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN
RX_BUF = NET_HDR_SIZE + GOOD_PACKET_LEN
RXQ, TXQ = 0, 1
CONFIG_MAC = 0
CONFIG_STATUS = 6
CONFIG_MTU = 10
RX_WINDOW = 32
ETHERTYPE_SIM = 0x88B5  # IEEE "local experimental": never mistaken for real traffic


@dataclass
class NetDriver:
    vmm: SimVmm
    window: Window
    queue_size: int = 256
    drv: VirtioMmioDriver = field(init=False)
    rxq: DriverQueue = field(init=False)
    txq: DriverQueue = field(init=False)
    mac: bytes = b""
    link_up: bool = True
    mtu: int = 1500
    counters: dict[str, int] = field(default_factory=lambda: {
        "tx_frames": 0, "tx_bytes": 0, "rx_frames": 0, "rx_bytes": 0})

    def start(self) -> None:
        self.drv = VirtioMmioDriver(self.vmm, self.window)
        if self.drv.probe() != VIRTIO_ID_NET:
            raise DeviceFailed(f"{self.window.base:#x}: device id {self.drv.device_id}, not net")
        self.drv.negotiate(DRIVER_FEATURES)
        self.rxq, self.txq = self.drv.setup_queues([self.queue_size, self.queue_size])
        if self.drv.has(VIRTIO_NET_F_MAC):
            self.mac = bytes(self.drv.config_read(CONFIG_MAC + i, 1) for i in range(6))
        if self.drv.has(VIRTIO_NET_F_STATUS):
            self.link_up = bool(self.drv.config_read(CONFIG_STATUS, 2) & VIRTIO_NET_S_LINK_UP)
        if self.drv.has(VIRTIO_NET_F_MTU):
            self.mtu = self.drv.config_read(CONFIG_MTU, 2)
        alloc = self.vmm.alloc
        self._rx_bufs = [alloc.alloc(RX_BUF, 64) for _ in range(self.rxq.size)]
        self._tx_free = [alloc.alloc(RX_BUF, 64) for _ in range(self.txq.size)]
        self.drv.driver_ok()  # then fill the receive queue, as virtnet_open's try_fill_recv
        for gpa in self._rx_bufs:
            self.rxq.add([], [(gpa, RX_BUF)], gpa)
        self.drv.kick(self.rxq)

    @property
    def features(self) -> int:
        return self.drv.features

    # -- transmit ----------------------------------------------------------------------------------
    def _reclaim_tx(self) -> bool:
        """Take back the buffers of transmitted frames; True when one is free."""
        while (u := self.txq.get_used()) is not None:
            self._tx_free.append(u[0])
        return bool(self._tx_free)

    def send(self, frame: bytes, kick: bool = True) -> None:
        """Queue one Ethernet frame (header pushed in front, one descriptor)."""
        if len(frame) > GOOD_PACKET_LEN:
            raise ValueError("frame larger than the device's MTU")
        self._reclaim_tx()
        if not self._tx_free:
            self.drv.wait(self._reclaim_tx)
        gpa = self._tx_free.pop()
        self.vmm.memory.write(gpa, bytes(NET_HDR_SIZE) + frame)
        self.txq.add([(gpa, NET_HDR_SIZE + len(frame))], [], gpa)
        self.counters["tx_frames"] += 1
        self.counters["tx_bytes"] += len(frame)
        if kick:
            self.drv.kick(self.txq)

    def kick_tx(self) -> None:
        self.drv.kick(self.txq)

    def flush_tx(self, timeout: float | None = None) -> None:
        """Wait until the device consumed every queued frame."""
        self.drv.wait(lambda: self._reclaim_tx() and self.txq.pending() == 0, timeout)

    # -- receive -----------------------------------------------------------------------------------
    def poll_rx(self) -> list[bytes]:
        """Frames received so far (headers stripped); their buffers go back to the device."""
        out = []
        mem = self.vmm.memory
        while (u := self.rxq.get_used()) is not None:
            gpa, length = u
            if not NET_HDR_SIZE <= length <= RX_BUF:
                raise SimError(f"rx used length {length} outside the buffer")
            frame = mem.read(gpa + NET_HDR_SIZE, length - NET_HDR_SIZE)
            out.append(frame)
            self.counters["rx_frames"] += 1
            self.counters["rx_bytes"] += len(frame)
            self.rxq.add([], [(gpa, RX_BUF)], gpa)
        if out:
            self.drv.kick(self.rxq)
        return out

    def receive(self, count: int, timeout: float | None = None) -> list[bytes]:
        frames: list[bytes] = []

        def ready() -> bool:
            frames.extend(self.poll_rx())
            return len(frames) >= count

        self.drv.wait(ready, timeout)
        return frames

    def stop(self) -> None:
        self.drv.teardown()


def make_frame(src: bytes, dst: bytes, seq: int, size: int, rng: random.Random) -> bytes:
    """An Ethernet frame of `size` bytes (>= 60) carrying its sequence number."""
    head = dst + src + struct.pack("!HI", ETHERTYPE_SIM, seq)
    return head + rng.randbytes(max(size, 60) - len(head))


def run_net_workload(dev: NetDriver, peer: socket.socket, *, frames: int = 200, seed: int = 2,
                     progress: Any = None) -> dict[str, Any]:
    """Frames guest -> backend (read on `peer`, the dgram backend's remote) and back.

    The guest transmits first so `peer` learns the backend's address, then `peer` sends frames
    to it and the guest receives them; every byte of every frame is compared.
    """
    rng = random.Random(seed)
    failures: list[str] = []
    peer.settimeout(dev.vmm.timeout)
    bcast = b"\xff" * 6
    sent = [make_frame(dev.mac or bytes(6), bcast, i, rng.randrange(60, 1515), rng)
            for i in range(frames)]
    t0 = time.perf_counter()
    backend_addr = None
    got = 0
    for i, frame in enumerate(sent):
        dev.send(frame, kick=(i % 16 == 15 or i == frames - 1))
        # Read as we go so the socket buffer never overflows (datagrams would be dropped).
        while got <= i - 32 or (i == frames - 1 and got < frames):
            try:
                data, backend_addr = peer.recvfrom(65536)
            except TimeoutError:
                failures.append(f"backend delivered {got} of {frames} frames")
                break
            if data != sent[got]:
                failures.append(f"tx frame {got} differs at the backend")
            got += 1
        if failures:
            break
    dev.flush_tx()
    t_tx = time.perf_counter() - t0
    t1 = time.perf_counter()
    received: list[bytes] = []
    back = [make_frame(bcast, dev.mac or bytes(6), i, rng.randrange(60, 1515), rng)
            for i in range(frames)]
    if backend_addr is None:
        failures.append("no frame reached the backend: its address is unknown")
    else:
        # A UDP socket's receive buffer is charged ~2 KiB+ per datagram whatever its size, so a
        # burst beyond ~100 frames can overflow the backend's default buffer and be dropped by
        # the kernel: pace the peer in windows the buffer always holds.
        window = max(1, min(RX_WINDOW, dev.rxq.size // 2))
        for i in range(0, frames, window):
            chunk = back[i:i + window]
            for frame in chunk:
                peer.sendto(frame, backend_addr)
            try:
                received.extend(dev.receive(len(chunk)))
            except SimError as exc:
                failures.append(f"guest received {len(received)} of {frames} frames: {exc}")
                break
        for k, frame in enumerate(received[:frames]):
            if frame != back[k]:
                failures.append(f"rx frame {k} differs in the guest")
                break
    t_rx = time.perf_counter() - t1
    return {"mac": ":".join(f"{b:02x}" for b in dev.mac), "link_up": dev.link_up, "mtu": dev.mtu,
            "tx_frames": got, "rx_frames": len(received),
            "tx_frames_per_s": round(got / t_tx) if t_tx else 0,
            "rx_frames_per_s": round(len(received) / t_rx) if t_rx else 0,
            "failures": failures}


def udp_peer(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return s


