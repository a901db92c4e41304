"""virtio-console (VIRTIO 1.2, section 5.3): ports backed by ptys, Unix sockets and files.

Queues (5.3.2): 0 receiveq0, 1 transmitq0; with MULTIPORT 2 control receiveq (c_ivq, device to
driver), 3 control transmitq (c_ovq), then receiveq/transmitq per extra port (4, 5 for port 1,
...). Linux shows port 0 as /dev/hvc0 and the others as /dev/vport<dev>p<port> with the name
from PORT_NAME in /sys/class/virtio-ports/*/name. The control flow is in console_control.py,
the ports (queue indexes, backends) in console_port.py.

Back-pressure both ways, nothing unbounded on the host:
- host to guest: the backend's fd is watched only while the port may take input (queue ready,
  and with MULTIPORT the guest opened the port: Linux discards data for closed ports) and the
  receiveq had buffers the last time we looked; bytes are read straight into those buffers.
- guest to host: a transmit chain is completed only once the backend took all of it; when the
  client is slow the chain stays pending and the transmitq is not consumed until the backend
  says it is writable again. Output while no client is attached goes to the port's ring.

Window size: port 0's pty size reaches the guest as config cols/rows plus a config-change
interrupt, and with MULTIPORT as a RESIZE control message (Linux ignores config changes then).
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from vmmiod.config import ConsoleConfig, GuestConfig
from vmmiod.devices import console_control as ctl
from vmmiod.devices.base import BackendError, VirtioDevice
from vmmiod.devices.console_control import ControlError, ControlEvent, ControlMessage
from vmmiod.devices.console_port import (
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    Port,
    port_of_queue,
)
from vmmiod.state.store import COPY as RING_COPY
from vmmiod.state.store import Slot
from vmmiod.transport import bit

RING_COPY_HEAD = RING_COPY.size

VIRTIO_ID_CONSOLE = 3

# Device feature bits (5.3.3).
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

# struct virtio_console_config (5.3.4): cols, rows, max_nr_ports, emerg_wr.
CONFIG = struct.Struct("<HHII")
CONFIG_EMERG_WR = 8

CONTROL_BACKLOG_BASE = 32  # queued device-to-driver control messages: base + 8 per port


class ConsoleDevice(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    type_name = "console"

    def __init__(self, cfg: ConsoleConfig, guest: GuestConfig, *,
                 access_platform: bool = False, log: Any = None) -> None:
        if not cfg.ports:
            raise ValueError(f"console {cfg.id}: at least one port is needed")
        self.cfg = cfg
        self.offer_multiport = cfg.multiport or len(cfg.ports) > 1
        nqueues = 2 * (len(cfg.ports) + 1) if self.offer_multiport else 2
        if log is None:
            import structlog
            log = structlog.get_logger().bind(guest=guest.name, device=cfg.id)
        super().__init__(cfg.id, [cfg.queue_size] * nqueues,
                         access_platform=access_platform, log=log)
        self.cols, self.rows = cfg.cols, cfg.rows
        self.ports = [Port(self, i, p, (self.cols, self.rows), self.log)
                      for i, p in enumerate(cfg.ports)]
        self.control_out: deque[bytes] = deque()  # device-to-driver messages not yet delivered
        self.control_backlog = CONTROL_BACKLOG_BASE + 8 * len(self.ports)
        self.counters.update({"bytes_to_guest": 0, "bytes_from_guest": 0, "dropped_bytes": 0,
                              "client_connects": 0, "emergency_writes": 0})
        for port in self.ports:
            for name in ("bytes_to_guest", "bytes_from_guest", "dropped_bytes",
                         "client_connects"):
                self.counters[f"port{port.index}_{name}"] = 0

    # -- features and config --------------------------------------------------------------------
    def device_features(self) -> int:
        f = super().device_features() | bit(VIRTIO_CONSOLE_F_SIZE)
        f |= bit(VIRTIO_CONSOLE_F_EMERG_WRITE)
        if self.offer_multiport:
            f |= bit(VIRTIO_CONSOLE_F_MULTIPORT)
        return f

    @property
    def multiport(self) -> bool:
        return self.has_feature(VIRTIO_CONSOLE_F_MULTIPORT)

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.cols, self.rows, len(self.ports), 0)

    def write_config(self, offset: int, size: int, value: int) -> None:
        # emerg_wr (5.3.4): one character for port 0, usable before any queue is set up.
        if offset == CONFIG_EMERG_WR and size in (1, 2, 4):
            self.counters["emergency_writes"] += 1
            self.ports[0].count.add("bytes_from_guest")
            self.ports[0].backend.write_urgent(bytes((value & 0xFF,)))

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        for port in self.ports:
            try:
                await port.backend.open()
            except OSError as exc:
                await self.close()
                raise BackendError(
                    f"console {self.cfg.id} port {port.index} ({port.name}): cannot open "
                    f"{port.backend.kind} backend: {exc}") from exc

    async def close(self) -> None:
        for port in self.ports:
            await port.backend.close()

    def reopen(self) -> None:
        for port in self.ports:
            port.backend.reopen()

    def on_activate(self) -> None:
        self.control_out.clear()
        for port in self.ports:
            port.forget_guest()
        # Without MULTIPORT only port 0 exists for the driver, and it is always open (hvc).
        if not self.multiport:
            if len(self.ports) > 1:
                self.log.warning("console_multiport_declined", unused_ports=len(self.ports) - 1)
            self._update_input(self.ports[0])

    def on_reset(self) -> None:
        self.control_out.clear()
        for port in self.ports:
            port.forget_guest()

    def on_queue_reset(self, index: int) -> None:
        """One queue disabled or reset: a transmit chain held from it is forgotten (its bytes
        are not sent, it never reaches the new ring)."""
        super().on_queue_reset(index)
        for port in self.ports:
            if port.txq == index:
                port.tx_pending = None

    # -- restart (docs/restart.md) --------------------------------------------------------------
    def record_bytes(self) -> int:
        return sum(2 * (RING_COPY_HEAD + p.cfg.buffer) for p in self.ports)

    def attach_record_area(self, area: memoryview) -> None:
        at = 0
        for port in self.ports:  # each port's held output, double-buffered (state/store.py)
            copy = RING_COPY_HEAD + port.cfg.buffer
            port.backend.ring.attach(Slot(area, at, copy))
            at += 2 * copy

    def export_state(self) -> dict[str, Any]:
        return {"ports": [[p.guest_ready, p.guest_open] for p in self.ports],
                "control_out": [m.hex() for m in self.control_out]}

    def import_state(self, state: dict[str, Any]) -> None:
        ports, out = state.get("ports"), state.get("control_out")
        if isinstance(ports, list) and len(ports) == len(self.ports):
            for port, flags in zip(self.ports, ports):
                if isinstance(flags, list) and all(isinstance(f, bool) for f in flags[:2]):
                    port.guest_ready, port.guest_open = flags[0], flags[1]
                self._update_input(port)
        if isinstance(out, list):
            try:
                msgs = [bytes.fromhex(m) for m in out[:self.control_backlog]]
            except (TypeError, ValueError):
                msgs = []
            self.control_out.extend(m for m in msgs if 0 < len(m) <= 4096)

    def schedule(self, index: int) -> None:
        """Run queue work soon (outside backend callbacks), like a notification would."""
        if not self.active or self.failed or index >= len(self.queues) or index in self._pending:
            return
        self._pending.add(index)
        if self._loop is not None:
            self._loop.call_soon(self._run_queue, index)
        else:
            self._run_queue(index)

    # -- queue work -----------------------------------------------------------------------------
    def _queue_ready(self, index: int) -> bool:
        return index < len(self.queues) and self.queues[index].ready

    def _port_usable(self, port: Port) -> bool:
        if not self.multiport:
            return port.index == 0
        return port.guest_ready

    def process_queue(self, index: int) -> None:
        if not self._queue_ready(index):
            return
        if index in (CONTROL_RECEIVEQ, CONTROL_TRANSMITQ):
            if not self.multiport:
                return
            if index == CONTROL_TRANSMITQ:
                self._handle_control_transmitq()
            self._flush_control()
            return
        p, is_tx = port_of_queue(index)
        if p >= len(self.ports) or (p and not self.multiport):
            return
        port = self.ports[p]
        if is_tx:
            self._drain_transmitq(port)
        else:
            self._fill_receiveq(port)

    def _update_input(self, port: Port) -> None:
        accepts = (self.active and not self.failed and self._queue_ready(port.rxq)
                   and self._port_usable(port) and (not self.multiport or port.guest_open))
        port.backend.set_input(accepts)

    def _fill_receiveq(self, port: Port) -> None:
        """Host input into the guest's receive buffers, while there are both."""
        self._update_input(port)
        if not port.backend.input_wanted:
            return
        q = self.queues[port.rxq]
        used = 0
        for _ in range(q.size):  # budget: a busy source cannot hold the loop forever
            chain = self.pop_chain(port.rxq)
            if chain is None:
                if q.enable_notification():
                    continue
                port.backend.set_input(False)  # until the guest adds buffers and kicks
                break
            if chain.writable_len == 0:
                q.add_used(chain.head, 0)
                used += 1
                continue
            n = port.backend.read_into(chain.writable_views())
            if n <= 0:
                self.unpop_chain(port.rxq, chain)
                break
            q.add_used(chain.head, n)
            used += 1
            port.count.add("bytes_to_guest", n)
        else:
            self.schedule(port.rxq)
        if used:
            self.notify_used(port.rxq)

    def _drain_transmitq(self, port: Port) -> None:
        """Guest output to the backend; stops (keeping the chain) when the backend is full."""
        q = self.queues[port.txq]
        used = 0
        for _ in range(q.size):
            if port.tx_pending is None:
                chain = self.pop_chain(port.txq)
                if chain is None:
                    if q.enable_notification():
                        continue
                    break
                port.tx_pending = (chain, 0)
            chain, done = port.tx_pending
            if not q.is_current(chain):  # popped before a queue reset: the driver took it back
                port.tx_pending = None
                continue
            blocked = False
            for view in chain.readable_views(done):
                n = port.backend.write(view)
                done += n
                if n < len(view):
                    blocked = True
                    break
            if blocked:
                port.tx_pending = (chain, done)
                break  # backend_writable() brings us back
            port.tx_pending = None
            q.add_used(chain.head, 0)
            used += 1
            port.count.add("bytes_from_guest", chain.readable_len)
        else:
            self.schedule(port.txq)
        if used:
            self.notify_used(port.txq)

    # -- control queues -------------------------------------------------------------------------
    def _handle_control_transmitq(self) -> None:
        q = self.queues[CONTROL_TRANSMITQ]
        used = 0
        for _ in range(q.size):
            chain = self.pop_chain(CONTROL_TRANSMITQ)
            if chain is None:
                if q.enable_notification():
                    continue
                break
            msg = ctl.parse_driver_message(chain.read(0, 64), len(self.ports))
            q.add_used(chain.head, 0)
            used += 1
            if isinstance(msg, ControlError):
                self.counters["control_dropped"] = self.counters.get("control_dropped", 0) + 1
                self.log.warning("console_control_invalid", reason=msg.value,
                                 length=chain.readable_len)
                continue
            self._on_control(msg)
        else:
            self.schedule(CONTROL_TRANSMITQ)
        if used:
            self.state_changed()  # ports the driver opened, before it sees its messages taken
            self.notify_used(CONTROL_TRANSMITQ)

    def _on_control(self, msg: ControlMessage) -> None:
        if msg.event is ControlEvent.DEVICE_READY:
            if not msg.value:
                self.log.warning("console_guest_device_failed")
                return
            for port in self.ports:
                self._send_control(ctl.encode(port.index, ControlEvent.DEVICE_ADD, 1))
            return
        port = self.ports[msg.id]
        if msg.event is ControlEvent.PORT_READY:
            if not msg.value:
                self.log.warning("console_guest_port_failed", port=port.index)
                return
            port.guest_ready = True
            if port.index == 0:
                self._send_control(ctl.encode(0, ControlEvent.CONSOLE_PORT, 1))
                self._send_control(ctl.encode_resize(0, self.cols, self.rows))
            if port.name:
                self._send_control(ctl.encode_name(port.index, port.name))
            if port.backend.connected:
                self._send_control(ctl.encode(port.index, ControlEvent.PORT_OPEN, 1))
            self.log.info("console_port_ready", port=port.index, name=port.name)
            self.schedule(port.txq)
        elif msg.event is ControlEvent.PORT_OPEN:
            port.guest_open = bool(msg.value)
            self.log.info("console_port_guest_open" if msg.value else "console_port_guest_closed",
                          port=port.index)
            self._update_input(port)
            if port.guest_open:
                self.schedule(port.rxq)

    def _send_control(self, message: bytes) -> None:
        if len(self.control_out) >= self.control_backlog:
            self.counters["control_dropped"] = self.counters.get("control_dropped", 0) + 1
            self.log.warning("console_control_overflow", backlog=len(self.control_out))
            return
        self.control_out.append(message)
        self.state_changed()
        self.schedule(CONTROL_RECEIVEQ)

    def _flush_control(self) -> None:
        if not self._queue_ready(CONTROL_RECEIVEQ):
            return
        q = self.queues[CONTROL_RECEIVEQ]
        used = 0
        while self.control_out:
            chain = self.pop_chain(CONTROL_RECEIVEQ)
            if chain is None:
                if q.enable_notification():
                    continue
                break
            message = self.control_out.popleft()
            n = chain.write(message)
            if n < len(message):
                self.log.warning("console_control_truncated", wanted=len(message), room=n)
            q.add_used(chain.head, n)
            used += 1
        if used:
            self.state_changed()  # the messages delivered leave the record with the chains
            self.notify_used(CONTROL_RECEIVEQ)

    # -- host events ----------------------------------------------------------------------------
    def host_connection_changed(self, port: Port, connected: bool) -> None:
        if self.active and self.multiport and port.guest_ready:
            self._send_control(ctl.encode(port.index, ControlEvent.PORT_OPEN, int(connected)))
        self._update_input(port)
        if connected:
            self.schedule(port.rxq)

    def resize(self, cols: int, rows: int) -> None:
        """Port 0's window changed (pty): tell the guest the way it negotiated."""
        self.cols, self.rows = cols & 0xFFFF, rows & 0xFFFF
        self.log.info("console_resized", cols=self.cols, rows=self.rows)
        if not self.active or self.failed:
            return
        if self.multiport:
            if self.ports[0].guest_ready:
                self._send_control(ctl.encode_resize(0, self.cols, self.rows))
            # cols/rows in config space changed all the same: ConfigGeneration must change
            # (Linux ignores the config interrupt that comes with it under MULTIPORT).
            if self.transport is not None:
                self.transport.signal_config_change()
        elif self.has_feature(VIRTIO_CONSOLE_F_SIZE) and self.transport is not None:
            self.transport.signal_config_change()
