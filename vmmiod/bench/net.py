"""virtio-net benchmark: the device next to a plain Python loop on the same TAP, in one run.

Workloads: 64-byte, 1514-byte (1500 MTU) and 64 KiB TSO frames, guest to host and host to
guest. The device runs in-process with the guest-side driver model (vmmiod/devices/
net_driver.py: mergeable receive buffers, EVENT_IDX) on uvloop when installed, as the daemon.

- guest -> host: the ring is filled with prepared frames outside the timed part; the timed
  part is what the daemon does per notification (pop, check header, os.writev from guest
  memory, used ring, interrupt decision). The plain loop is `os.write(tap, hdr + frame)`.
  Frames go to a foreign MAC, so the host kernel drops them right after the TAP.
- host -> guest: a producer process floods the TAP through an AF_PACKET socket (with a
  virtio-net header for the TSO frames); `device` counts time inside the device's reader
  callback (readv into guest buffers, num_buffers, used ring), `e2e` the wall time with the
  driver model recycling buffers on the same CPU. The plain loop is `os.readv(tap, [buf])`.
  With two CPUs the producer may be the limit of the plain loop; its offered rate is shown.

Needs root for the TAP (it runs inside a network namespace it creates and removes); without
root it falls back to the dgram backend over UDP on 127.0.0.1 (no TSO row) and says so.
Run: `python -m vmmiod.bench.net [--quick]`.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmmiod.bench.options import quick_option
from vmmiod.config import (
    DgramBackend,
    GuestConfig,
    MmioConfig,
    NetConfig,
    SocketAddress,
    TapBackend,
)
from vmmiod.devices.net import NetDevice
from vmmiod.devices.net_proto import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4
from vmmiod.memory import memfd_memory
from vmmiod.sim.net_model import NetDriver, NetHdr
from vmmiod.sim.net_testkit import NetNamespace, ether, ipv4, tcp_segment
from vmmiod.sim.vring import Allocator

GPA = 0x4000_0000
MEM_SIZE = 64 << 20
QUEUE_SIZE = 256
TAP = "vbench0"
FOREIGN_MAC = bytes.fromhex("020000000099")
PEER_MAC = bytes.fromhex("020000000042")
ETH_P_EXPERIMENTAL = 0x88B5
TSO_HDR = NetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
                 gso_size=1448, csum_start=34, csum_offset=16)

PRODUCER = r"""
import socket, sys
mode, target, path, vnet = sys.argv[1:5]
data = open(path, "rb").read()
if mode == "packet":
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    if vnet == "1":
        s.setsockopt(263, 15, 1)          # PACKET_VNET_HDR
    try:
        s.setsockopt(263, 20, 1)          # PACKET_QDISC_BYPASS
    except OSError:
        pass
    s.bind((target, 0))
    send = s.send
    while True:
        try:
            send(data)
        except OSError:
            pass
else:
    host, port = target.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = (host, int(port))
    while True:
        try:
            s.sendto(data, addr)
        except OSError:
            pass
"""


class _NullLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None

    def bind(self, **kw: Any) -> _NullLog:
        return self


def frames(guest_mac: bytes) -> dict[str, tuple[bytes, NetHdr, bool]]:
    """name -> (Ethernet frame, header, is TSO)."""
    payload = bytes(range(256)) * 254
    tcp = tcp_segment("10.0.0.2", "10.0.0.1", 4000, 5000, 1, payload[:65000])
    return {
        "64B": (ether(FOREIGN_MAC, guest_mac, ETH_P_EXPERIMENTAL, bytes(50)), NetHdr(), False),
        "1514B": (ether(FOREIGN_MAC, guest_mac, ETH_P_EXPERIMENTAL, payload[:1500]), NetHdr(),
                  False),
        "64KiB-TSO": (ether(FOREIGN_MAC, guest_mac, 0x0800,
                            ipv4("10.0.0.2", "10.0.0.1", 6, tcp)), TSO_HDR, True),
    }


class Rig:
    """A NetDevice and its driver model on one backend."""

    def __init__(self, backend: TapBackend | DgramBackend, rx_buf_size: int | None = None) -> None:
        self.memory, self.memfd = memfd_memory(MEM_SIZE, GPA)
        self.alloc = Allocator(GPA, MEM_SIZE)
        cfg = NetConfig(id="bench", mmio=MmioConfig(base=0x1000, irq=5), backend=backend,
                        queue_size=QUEUE_SIZE)
        self.device = NetDevice(cfg, GuestConfig("bench"), log=_NullLog())
        self.rx_buf_size = rx_buf_size
        self.device_time = 0.0

    async def start(self) -> None:
        await self.device.open()
        self.driver = NetDriver(self.device, self.memory, self.alloc, queue_size=QUEUE_SIZE,
                                rx_buf_size=self.rx_buf_size)
        inner = self.device.rx.ready

        def timed() -> None:  # time inside the device's reader callback only
            t0 = time.perf_counter()
            inner()
            self.device_time += time.perf_counter() - t0
        self.device.rx.ready = timed  # type: ignore[method-assign]

    async def stop(self) -> None:
        self.device.reset()
        await self.device.close()
        os.close(self.memfd)

    # -- guest -> host --------------------------------------------------------------------------
    async def tx(self, frame: bytes, hdr: NetHdr, count: int) -> tuple[float, float]:
        """(device seconds, wall seconds) to transmit `count` frames."""
        d = self.driver
        data = hdr.pack(d.hdr_len) + frame
        slots = [self.alloc.alloc(len(data)) for _ in range(QUEUE_SIZE)]
        for gpa in slots:
            self.memory.write(gpa, data)
        dev_time = 0.0
        sent = 0
        t_start = time.perf_counter()
        while sent < count:
            n = min(d.txq.num_free, count - sent, len(slots))
            for i in range(n):
                d.send_prepared(slots[i], len(data))
            d.txq.kick_prepare()
            t0 = time.perf_counter()
            self.device.process_queue(1)
            dev_time += time.perf_counter() - t0
            sent += n
            while d.txq.get_used() is not None:
                pass
            await asyncio.sleep(0)
        return dev_time, time.perf_counter() - t_start

    # -- host -> guest --------------------------------------------------------------------------
    async def rx(self, seconds: float) -> tuple[int, float, float]:
        """(frames, device seconds, wall seconds) received while the producer runs."""
        d = self.driver
        d.post_rx()
        stop = False

        async def recycle() -> int:
            n = 0
            while not stop:
                await d.transport.wait(0.05)
                n += d.rx_recycle()
            return n
        self.device_time = 0.0
        before = self.device.counters["rx_frames"]
        t0 = time.perf_counter()
        task = asyncio.ensure_future(recycle())
        await asyncio.sleep(seconds)
        stop = True
        wall = time.perf_counter() - t0
        await task
        return self.device.counters["rx_frames"] - before, self.device_time, wall


def plain_tx(fd: int, data: bytes, count: int, send: Callable[[bytes], Any] | None) -> float:
    write = send or (lambda b: os.write(fd, b))
    t0 = time.perf_counter()
    for _ in range(count):
        write(data)
    return time.perf_counter() - t0


def plain_rx(fd: int, seconds: float) -> int:
    buf = memoryview(bytearray(70000))
    n = 0
    end = time.perf_counter() + seconds
    readv = os.readv
    while time.perf_counter() < end:
        try:
            readv(fd, [buf])
            n += 1
        except BlockingIOError:
            select.select([fd], [], [], 0.05)
    return n


def drain(fd: int) -> None:
    buf = bytearray(70000)
    while True:
        try:
            os.readv(fd, [buf])
        except OSError:
            return


def start_producer(tmp: Path, mode: str, target: str, data: bytes, vnet: bool) -> subprocess.Popen[bytes]:
    path = tmp / "frame.bin"
    path.write_bytes(data)
    script = tmp / "producer.py"
    script.write_text(PRODUCER)
    return subprocess.Popen([sys.executable, str(script), mode, target, str(path),
                             "1" if vnet else "0"])


def tap_counts(ns: NetNamespace) -> int:
    st = json.loads(ns.ip("-j", "-s", "link", "show", TAP))[0]["stats64"]["tx"]
    return int(st["packets"]) + int(st["dropped"])


def _row(frame_len: int, fps: float) -> dict[str, float]:
    return {"frames_s": fps, "gbit_s": fps * frame_len * 8 / 1e9}


async def bench_tap(ns: NetNamespace, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"backend": "tap"}
    secs = 0.5 if quick else 2.0
    with tempfile.TemporaryDirectory(prefix="vmmiod-bench-net-") as td:
        tmp = Path(td)
        for name in ("64B", "1514B", "64KiB-TSO"):
            rig = Rig(TapBackend(ifname=TAP), rx_buf_size=4096 if "TSO" in name else None)
            await rig.start()
            frame, hdr, tso = frames(rig.device.mac)[name]
            count = (2000 if tso else 20000) if quick else (10000 if tso else 100000)
            # guest -> host
            dev_s, wall_s = await rig.tx(frame, hdr, count)
            plain_s = plain_tx(rig.device.backend.fd, hdr.pack() + frame, count, None)
            dev = _row(len(frame), count / dev_s)
            e2e = _row(len(frame), count / wall_s)
            plain = _row(len(frame), count / plain_s)
            results[f"g2h {name}"] = {"device": dev, "e2e": e2e, "plain": plain,
                                      "ratio": dev["frames_s"] / plain["frames_s"]}
            # host -> guest: the frame comes back addressed to the guest
            inbound = ether(rig.device.mac, PEER_MAC, *_ethertype_and_payload(frame))
            data = (hdr.pack()[:10] if tso else b"") + inbound
            prod = start_producer(tmp, "packet", TAP, data, tso)
            try:
                await asyncio.sleep(0.2)
                c0 = tap_counts(ns)
                got, dev_s, wall_s = await rig.rx(secs)
                offered = (tap_counts(ns) - c0) / wall_s
                rig.device.rx.stop()
                drain(rig.device.backend.fd)
                t0 = time.perf_counter()
                plain_n = plain_rx(rig.device.backend.fd, secs)
                plain_wall = time.perf_counter() - t0
            finally:
                prod.kill()
                prod.wait()
            dev = _row(len(inbound), got / dev_s if dev_s else 0.0)
            plain = _row(len(inbound), plain_n / plain_wall)
            results[f"h2g {name}"] = {"device": dev, "e2e": _row(len(inbound), got / wall_s),
                                      "plain": plain, "offered_frames_s": offered,
                                      "ratio": dev["frames_s"] / plain["frames_s"]
                                      if plain["frames_s"] else 0.0}
            await rig.stop()
    return results


def _sender(sock: socket.socket, addr: tuple[str, int]) -> Callable[[bytes], Any]:
    return lambda b: sock.sendto(b, addr)


def _ethertype_and_payload(frame: bytes) -> tuple[int, bytes]:
    return int.from_bytes(frame[12:14], "big"), frame[14:]


async def bench_dgram(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"backend": "dgram (not root: UDP on 127.0.0.1, no TSO)"}
    secs = 0.5 if quick else 2.0
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))  # never read: the kernel drops what overflows it
    sink_port = sink.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="vmmiod-bench-net-") as td:
        tmp = Path(td)
        for name in ("64B", "1514B"):
            tx_rig = Rig(DgramBackend(local=SocketAddress("udp", "127.0.0.1", 0),
                                      remote=SocketAddress("udp", "127.0.0.1", sink_port)))
            await tx_rig.start()
            frame, hdr, _tso = frames(tx_rig.device.mac)[name]
            count = 20000 if quick else 100000
            dev_s, wall_s = await tx_rig.tx(frame, hdr, count)
            plain_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            addr = ("127.0.0.1", sink_port)
            plain_s = plain_tx(-1, frame, count, _sender(plain_sock, addr))
            plain_sock.close()
            await tx_rig.stop()
            dev = _row(len(frame), count / dev_s)
            plain = _row(len(frame), count / plain_s)
            results[f"g2h {name}"] = {"device": dev, "e2e": _row(len(frame), count / wall_s),
                                      "plain": plain, "ratio": dev["frames_s"] / plain["frames_s"]}
            rx_rig = Rig(DgramBackend(local=SocketAddress("udp", "127.0.0.1", 0)))
            await rx_rig.start()
            port = rx_rig.device.backend.local_address[1]  # type: ignore[attr-defined]
            inbound = ether(rx_rig.device.mac, PEER_MAC, *_ethertype_and_payload(frame))
            prod = start_producer(tmp, "udp", f"127.0.0.1:{port}", inbound, False)
            try:
                await asyncio.sleep(0.2)
                got, dev_s, wall_s = await rx_rig.rx(secs)
                rx_rig.device.rx.stop()
                fd = rx_rig.device.backend.fd
                drain(fd)
                t0 = time.perf_counter()
                plain_n = plain_rx(fd, secs)
                plain_wall = time.perf_counter() - t0
            finally:
                prod.kill()
                prod.wait()
            await rx_rig.stop()
            dev = _row(len(inbound), got / dev_s if dev_s else 0.0)
            plain = _row(len(inbound), plain_n / plain_wall)
            results[f"h2g {name}"] = {"device": dev, "e2e": _row(len(inbound), got / wall_s),
                                      "plain": plain, "ratio": dev["frames_s"] / plain["frames_s"]
                                      if plain["frames_s"] else 0.0}
    sink.close()
    return results


def _run_loop(coro_fn: Callable[[], Any]) -> Any:
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


def run(quick: bool = False) -> dict[str, Any]:
    can_tap = os.geteuid() == 0 and os.path.exists("/dev/net/tun")
    if can_tap:
        try:
            with NetNamespace("vmmiod-b") as ns:
                ns_result: dict[str, Any] = ns.run(_run_loop, lambda: bench_tap(ns, quick))
                return ns_result
        except (OSError, subprocess.CalledProcessError) as exc:
            note = f"TAP benchmark unavailable ({exc}); dgram instead"
    else:
        note = "not root: the TAP needs CAP_NET_ADMIN; measured the dgram backend instead"
    result: dict[str, Any] = _run_loop(lambda: bench_dgram(quick))
    result["note"] = note
    return result


def main(argv: list[str] | None = None) -> int:
    results = run(quick=quick_option("net", "virtio-net figures: frames per second through the device, end to end and a plain loop.", argv))
    print(f"virtio-net benchmark, backend: {results['backend']}")
    if "note" in results:
        print(f"note: {results['note']}")
    print(f"{'workload':16} {'device f/s':>11} {'Gbit/s':>7} | {'e2e f/s':>9} {'Gbit/s':>7} | "
          f"{'plain f/s':>10} {'Gbit/s':>7} | {'ratio':>6}")
    for key, r in results.items():
        if not isinstance(r, dict):
            continue
        d, e, p = r["device"], r["e2e"], r["plain"]
        extra = f"  (offered {r['offered_frames_s']:,.0f} f/s)" if "offered_frames_s" in r else ""
        print(f"{key:16} {d['frames_s']:11,.0f} {d['gbit_s']:7.2f} | {e['frames_s']:9,.0f} "
              f"{e['gbit_s']:7.2f} | {p['frames_s']:10,.0f} {p['gbit_s']:7.2f} | "
              f"{r['ratio']:6.2f}{extra}")
    print("ratio = device frames/s over the plain Python loop's, same TAP, same run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
