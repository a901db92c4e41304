"""Guest side for the console tests: a driver that behaves like Linux's virtio_console.c.

Queues live in memfd guest memory, built with the shared driver model (vmmiod/sim/vring.py);
the device's SplitQueues are activated directly (no mmio window). The multiport flow is
Linux's: fill the control receiveq, send DEVICE_READY; on DEVICE_ADD fill the port's receiveq
and answer PORT_READY; on CONSOLE_PORT open the port (hvc sends PORT_OPEN 1); RESIZE, PORT_NAME
and PORT_OPEN update the port's state. (No tests here: helpers only.)
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vmmiod.devices.console import (
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    ConsoleDevice,
)
from vmmiod.devices.console_control import (
    CONTROL,
    RESIZE,
    VIRTIO_CONSOLE_BAD_ID,
    ControlEvent,
)
from vmmiod.devices.console_port import receiveq_index, transmitq_index
from vmmiod.memory import memfd_memory
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.transport import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, bit
from vmmiod.virtqueue import SplitQueue

GPA = 0x4000_0000
T = TypeVar("T")


def run_async(fn: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """Run an async test body in a fresh event loop (the backends need a running loop)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))  # type: ignore[arg-type]
    return wrapper


class FakeTransport:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.used: dict[int, int] = {}
        self.config_changes = 0
        self.faults: list[str] = []

    def signal_used(self, queue_index: int) -> None:
        self.used[queue_index] = self.used.get(queue_index, 0) + 1
        self.event.set()

    def signal_config_change(self) -> None:
        self.config_changes += 1
        self.event.set()

    def device_fault(self, reason: str) -> None:
        self.faults.append(reason)
        self.event.set()


@dataclass
class GuestPort:
    id: int
    added: bool = False
    console: bool = False
    name: str | None = None
    host_connected: bool = False
    size: tuple[int, int] | None = None  # (cols, rows) from RESIZE
    received: bytearray = field(default_factory=bytearray)


class ConsoleGuest:
    """A Linux-like virtio_console driver over the device's queues."""

    def __init__(self, device: ConsoleDevice, *, multiport: bool, ram: int = 64 << 20,
                 queue_size: int = 64, rx_buf: int = 4096, event_idx: bool = True) -> None:
        self.device = device
        self.memory, self.memfd = memfd_memory(ram, GPA)
        self.alloc = Allocator(GPA, ram)
        self.transport = FakeTransport()
        self.multiport = multiport
        self.rx_buf = rx_buf
        nq = len(device.queue_max_sizes) if multiport else 2
        self.driver: dict[int, DriverQueue] = {}
        queues = []
        for i, max_size in enumerate(device.queue_max_sizes):
            sq = SplitQueue(max_size, i)
            if i < nq:
                size = min(queue_size, max_size)
                dq = DriverQueue(self.memory, self.alloc, size, index=i, event_idx=event_idx)
                self.driver[i] = dq
                sq.size = size
                sq.desc_addr, sq.avail_addr, sq.used_addr = (
                    dq.desc_addr, dq.avail_addr, dq.used_addr)
                sq.activate(self.memory, event_idx=event_idx)
            queues.append(sq)
        features = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_CONSOLE_F_SIZE)
                    | bit(VIRTIO_CONSOLE_F_EMERG_WRITE))
        if event_idx:
            features |= bit(VIRTIO_F_EVENT_IDX)
        if multiport:
            features |= bit(VIRTIO_CONSOLE_F_MULTIPORT)
        nports = len(device.ports) if multiport else 1
        self.ports = [GuestPort(i) for i in range(nports)]
        self.free_tx: list[tuple[int, int]] = []
        self.control_log: list[tuple[int, ControlEvent, int]] = []
        device.activate(self.memory, queues, features, self.transport)  # type: ignore[arg-type]
        if multiport:
            self._fill(CONTROL_RECEIVEQ, 4096)
            self.send_control(VIRTIO_CONSOLE_BAD_ID, ControlEvent.DEVICE_READY, 1)
        else:
            self.ports[0].added = self.ports[0].console = True
            self._fill(receiveq_index(0), rx_buf)

    def close(self) -> None:
        self.device.reset()
        self.memory.close()
        os.close(self.memfd)

    # -- queue plumbing -------------------------------------------------------------------------
    def kick(self, index: int) -> None:
        if self.driver[index].kick_prepare():
            self.device.queue_notify(index)

    def _fill(self, index: int, size: int, count: int | None = None) -> None:
        dq = self.driver[index]
        n = dq.num_free if count is None else min(count, dq.num_free)
        for _ in range(n):
            gpa = self.alloc.alloc(size, 8)
            dq.add([], [(gpa, size)], token=(gpa, size))
        self.kick(index)

    def send_control(self, port_id: int, event: ControlEvent, value: int) -> None:
        self.send_raw(CONTROL_TRANSMITQ, CONTROL.pack(port_id, event, value))

    def send_raw(self, index: int, data: bytes) -> None:
        self._reap_tx(index)
        gpa = self.alloc.alloc(max(len(data), 1), 8)
        self.memory.write(gpa, data)
        self.driver[index].add([(gpa, len(data))], [], token=(gpa, len(data)))
        self.kick(index)

    def write(self, port: int, data: bytes | memoryview, chunk: int = 65536) -> int:
        """Queue as much of `data` as the transmitq has room for; returns bytes queued."""
        index = transmitq_index(port)
        dq = self.driver[index]
        self._reap_tx(index)
        done = 0
        while done < len(data) and dq.num_free:
            part = data[done:done + chunk]
            gpa = self.alloc.alloc(chunk, 8)
            self.memory.write(gpa, part)
            dq.add([(gpa, len(part))], [], token=(gpa, chunk))
            done += len(part)
        if done:
            self.kick(index)
        return done

    def _reap_tx(self, index: int) -> int:
        n = 0
        for (gpa, size), _ in self.driver[index].drain_used():
            self.alloc.free(gpa, size)
            n += 1
        return n

    def tx_outstanding(self, port: int) -> int:
        return self.driver[transmitq_index(port)].pending()

    # -- polling (what the driver's interrupt handlers do) --------------------------------------
    def poll(self) -> bool:
        progress = False
        if self.multiport:
            progress |= self._poll_control()
            if CONTROL_TRANSMITQ in self.driver:
                progress |= bool(self._reap_tx(CONTROL_TRANSMITQ))
        for port in self.ports:
            if not port.added:
                continue
            index = receiveq_index(port.id)
            dq = self.driver[index]
            got = dq.drain_used()
            for (gpa, size), length in got:
                assert length <= size, "device wrote more than the buffer"
                port.received += self.memory.read(gpa, length)
                dq.add([], [(gpa, size)], token=(gpa, size))
            if got:
                self.kick(index)
                progress = True
            progress |= bool(self._reap_tx(transmitq_index(port.id)))
        return progress

    def _poll_control(self) -> bool:
        dq = self.driver[CONTROL_RECEIVEQ]
        got = dq.drain_used()
        for (gpa, size), length in got:
            self._handle_control(self.memory.read(gpa, length))
            dq.add([], [(gpa, size)], token=(gpa, size))
        if got:
            self.kick(CONTROL_RECEIVEQ)
        return bool(got)

    def _handle_control(self, msg: bytes) -> None:
        port_id, event, value = CONTROL.unpack_from(msg)
        ev = ControlEvent(event)
        self.control_log.append((port_id, ev, value))
        if port_id >= len(self.ports):
            return
        port = self.ports[port_id]
        if ev is ControlEvent.DEVICE_ADD:
            if port.added:
                self.send_control(port_id, ControlEvent.PORT_READY, 1)
                return
            port.added = True
            self._fill(receiveq_index(port_id), self.rx_buf)
            self.send_control(port_id, ControlEvent.PORT_READY, 1)
        elif ev is ControlEvent.CONSOLE_PORT and value and not port.console:
            port.console = True
            self.send_control(port_id, ControlEvent.PORT_OPEN, 1)  # init_port_console
        elif ev is ControlEvent.RESIZE:
            cols, rows = RESIZE.unpack_from(msg, CONTROL.size)
            port.size = (cols, rows)
        elif ev is ControlEvent.PORT_OPEN:
            port.host_connected = bool(value)
        elif ev is ControlEvent.PORT_NAME and port.name is None:
            port.name = msg[CONTROL.size:].split(b"\0", 1)[0].decode()

    def open_port(self, port_id: int) -> None:
        """A guest process opens /dev/vport*p<port_id>."""
        self.send_control(port_id, ControlEvent.PORT_OPEN, 1)

    async def until(self, cond: Callable[[], bool], timeout: float = 10.0,
                    what: str = "condition") -> None:
        """Run the driver until `cond()` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.transport.event.clear()
            self.poll()
            if cond():
                return
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                await asyncio.wait_for(self.transport.event.wait(), min(left, 0.02))
            except TimeoutError:
                pass
