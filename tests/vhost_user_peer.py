"""A vhost-user front-end for tests: the VMM side, as QEMU plays it.

Guest RAM is a sealed memfd mapped here and handed to the back-end with its fd; rings are built
in it with the project's guest-side driver model (vmmiod/sim/vring.py); kicks and calls are real
eventfds. The messages follow QEMU's order (vhost_user_backend_init, vhost_dev_start). Every
step is a plain method so hostile tests can send anything in any order (`send`).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.memory import MappedMemory
from vmmiod.sim import vhost_front as front
from vmmiod.sim.vring import Allocator, DriverQueue

GPA = 0x1_0000_0000  # guest-physical base of the RAM
UVA = 0x7F00_0000_0000  # the front-end's "user address" of the same RAM
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_INDIRECT_DESC = 28
PROTOCOL_WANTED = w.PROTOCOL_FEATURES


def sealed_memfd(size: int, name: str = "guest-ram") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@dataclass
class Ring:
    q: DriverQueue
    kick: int
    call: int


@dataclass
class FrontEnd:
    sock: socket.socket
    ram_size: int = 16 << 20
    memfd: int = -1
    ram: mmap.mmap = field(init=False)
    memory: MappedMemory = field(init=False)
    alloc: Allocator = field(init=False)
    rings: dict[int, Ring] = field(default_factory=dict)
    features: int = 0
    protocol: int = 0

    def __post_init__(self) -> None:
        if self.memfd < 0:
            self.memfd = sealed_memfd(self.ram_size)
        self.ram = mmap.mmap(self.memfd, self.ram_size, flags=mmap.MAP_SHARED)
        self.memory = MappedMemory()
        self.memory.add_buffer(GPA, self.ram)
        self.alloc = Allocator(GPA, self.ram_size)

    # -- wire --------------------------------------------------------------------------------------
    def send(self, req: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             need_reply: bool = False, flags: int | None = None) -> None:
        data = w.request(req, payload, need_reply)
        if flags is not None:
            data = w.HEADER.pack(req, flags, len(payload)) + payload
        front.send(self.sock, data, fds)

    def recv_reply(self, req: int) -> bytes:
        payload, fds = self.recv_reply_fds(req)
        for fd in fds:  # a reply that carries none is what every caller of this expects
            os.close(fd)
        return payload

    def recv_reply_fds(self, req: int) -> tuple[bytes, list[int]]:
        request, flags, payload, fds = front.recv_message(self.sock)
        assert request == req, f"reply to {request}, expected {req}"
        assert flags & w.FLAG_REPLY and flags & w.VERSION_MASK == w.VERSION
        return payload, fds

    def call_u64(self, req: int, payload: bytes = b"") -> int:
        self.send(req, payload)
        value: int = w.U64.unpack(self.recv_reply(req))[0]
        return value

    def ack(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        """Send with NEED_REPLY (REPLY_ACK) and check the back-end answered 0."""
        self.send(req, payload, fds, need_reply=True)
        assert w.U64.unpack(self.recv_reply(req))[0] == 0

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(4096):
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    # -- QEMU's sequence -----------------------------------------------------------------------------
    def negotiate(self, want: int | None = None) -> int:
        offered = self.call_u64(w.GET_FEATURES)
        assert offered >> w.F_PROTOCOL_FEATURES & 1
        proto = self.call_u64(w.GET_PROTOCOL_FEATURES)
        self.protocol = proto & PROTOCOL_WANTED
        self.send(w.SET_PROTOCOL_FEATURES, w.U64.pack(self.protocol))
        self.send(w.SET_OWNER)
        self.features = offered if want is None else offered & (want | 1 << w.F_PROTOCOL_FEATURES)
        self.ack(w.SET_FEATURES, w.U64.pack(self.features))
        return offered

    def region(self) -> w.MemRegion:
        return w.MemRegion(GPA, self.ram_size, UVA, 0)

    def set_mem_table(self) -> None:
        self.ack(w.SET_MEM_TABLE, w.pack_memory([self.region()]), (self.memfd,))

    def add_mem_reg(self) -> None:
        self.ack(w.ADD_MEM_REG, w.pack_mem_reg(self.region()), (self.memfd,))

    def uva(self, gpa: int) -> int:
        return gpa - GPA + UVA

    def start_ring(self, index: int, size: int = 64, base: int = 0, enable: bool = True,
                   q: DriverQueue | None = None) -> Ring:
        if q is None:
            q = DriverQueue(self.memory, self.alloc, size, index=index,
                            event_idx=bool(self.features >> VIRTIO_F_EVENT_IDX & 1),
                            indirect=bool(self.features >> VIRTIO_F_INDIRECT_DESC & 1))
        self.ack(w.SET_VRING_NUM, w.STATE.pack(index, q.size))
        self.ack(w.SET_VRING_BASE, w.STATE.pack(index, base))
        self.ack(w.SET_VRING_ADDR, w.pack_addr(w.VringAddr(
            index, 0, self.uva(q.desc_addr), self.uva(q.used_addr), self.uva(q.avail_addr), 0)))
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ack(w.SET_VRING_CALL, w.U64.pack(index), (call,))
        self.ack(w.SET_VRING_KICK, w.U64.pack(index), (kick,))
        if enable:
            self.ack(w.SET_VRING_ENABLE, w.STATE.pack(index, 1))
        ring = self.rings[index] = Ring(q, kick, call)
        return ring

    def stop_ring(self, index: int) -> int:
        self.send(w.GET_VRING_BASE, w.STATE.pack(index, 0))
        i, num = w.STATE.unpack(self.recv_reply(w.GET_VRING_BASE))
        assert i == index
        return int(num)

    def kick(self, index: int) -> None:
        os.eventfd_write(self.rings[index].kick, 1)

    def wait_call(self, index: int, timeout: float = 10.0) -> bool:
        fd = self.rings[index].call
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return False
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        return True

    def wait_used(self, index: int, count: int = 1, timeout: float = 10.0) -> list[tuple[object, int]]:
        out: list[tuple[object, int]] = []
        deadline = time.monotonic() + timeout
        q = self.rings[index].q
        while len(out) < count:
            out.extend(q.drain_used())
            if len(out) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(out)} of {count} used buffers on ring {index}")
            self.wait_call(index, min(left, 0.2))
        return out

    def close(self) -> None:
        for r in self.rings.values():
            os.close(r.kick)
            os.close(r.call)
        self.rings.clear()
        self.sock.close()
        self.memory.close()
        try:
            self.ram.close()
        except BufferError:
            pass
        os.close(self.memfd)


# -- guest drivers (just enough to drive each device type) ---------------------------------------
BLK_HDR = struct.Struct("<IIQ")
BLK_T_IN, BLK_T_OUT, BLK_T_FLUSH, BLK_T_GET_ID = 0, 1, 4, 8


def blk_request(fe: FrontEnd, index: int, kind: int, sector: int, data: bytes = b"",
                read_len: int = 0, token: object = None) -> tuple[int, int, int]:
    """Queue one virtio-blk request; returns (header gpa, data gpa, status gpa)."""
    q = fe.rings[index].q
    hdr = fe.alloc.alloc(16)
    fe.memory.write(hdr, BLK_HDR.pack(kind, 0, sector))
    status = fe.alloc.alloc(1)
    fe.memory.write(status, b"\xff")
    buf = fe.alloc.alloc(max(len(data), read_len, 1))
    out = [(hdr, 16)]
    in_: list[tuple[int, int]] = []
    if data:
        fe.memory.write(buf, data)
        out.append((buf, len(data)))
    elif read_len:
        in_.append((buf, read_len))
    in_.append((status, 1))
    q.add(out, in_, token if token is not None else (hdr, buf, status))
    return hdr, buf, status


# -- the daemon's serving half in a thread ------------------------------------------------------
class ThreadedVhost:
    """A VhostUserAdaptor on its own loop in a thread, serving `devices` (id, device, socket)."""

    def __init__(self, devices: list[tuple[str, object, str]], *, reconnect: float = 0.1) -> None:
        import asyncio
        import threading

        import structlog

        from vmmiod.config import Config, GuestConfig, LogConfig, VhostUserConfig

        self.specs = devices
        self.config = Config(__import__("pathlib").Path("/dev/null"), GuestConfig("t"),
                             VhostUserConfig(reconnect=reconnect), LogConfig(), ())
        self.log = structlog.get_logger()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.adaptor: object = None

    def run(self, coro: object, timeout: float = 10.0) -> object:
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore

    def call(self, fn: object) -> object:
        async def go() -> object:
            return fn()  # type: ignore[operator]
        return self.run(go())

    def start(self) -> ThreadedVhost:
        from pathlib import Path

        from vmmiod.hypervisors.vhost_user import VhostUserAdaptor

        self._thread.start()

        async def up() -> None:
            self.adaptor = a = VhostUserAdaptor(self.config, None, self.log)
            for dev_id, dev, path in self.specs:
                await dev.open()  # type: ignore[attr-defined]
                connect = path.startswith("connect:")
                a.add_device(dev_id, dev, Path(path.removeprefix("connect:")),  # type: ignore
                             connect)
            await a.start()  # type: ignore[attr-defined]

        self.run(up())
        return self

    def stop(self) -> None:
        async def down() -> None:
            self.adaptor.close_connections()  # type: ignore[attr-defined]
            for _, dev, _ in self.specs:
                await dev.close()  # type: ignore[attr-defined]
            await self.adaptor.stop()  # type: ignore[attr-defined]

        try:
            self.run(down())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    def __enter__(self) -> ThreadedVhost:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
