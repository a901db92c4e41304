"""The back-end's protocol state machine for one connection to one device.

Messages come in already framed (header, payload, fds) and go out as replies; the only I/O is
through `SessionIO` (watching kick eventfds). Every message is checked before it changes
anything: its size, its fds (exactly as many as it carries, of the right kind), its order
(nothing but negotiation before SET_OWNER, no ring reconfigured while it runs, features gated
by what was negotiated). A violation raises `MessageError` and the adaptor closes the
connection; `close()` then stops every ring, resets the device and unmaps memory.

Ring lifecycle (docs/interop/vhost-user.rst, "Ring states"): a ring starts at SET_VRING_KICK
(its addresses translated through the memory table and checked by the SplitQueue), stops at
GET_VRING_BASE; it is enabled by SET_VRING_ENABLE (or from the start when the protocol
features were not negotiated). The device is activated when its first ring starts and reset
when its last ring stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.hypervisors.vhost_user.device import VhostDevice, VhostTransport
from vmmiod.hypervisors.vhost_user.inflight import InflightRecord
from vmmiod.hypervisors.vhost_user.memtable import MAX_MEM_SLOTS, VhostMemory
from vmmiod.hypervisors.vhost_user.rings import Reply, RingHandlers
from vmmiod.hypervisors.vhost_user.vring import VhostQueue, Vring, close_quietly

BEFORE_OWNER = frozenset({w.GET_FEATURES, w.GET_PROTOCOL_FEATURES, w.SET_PROTOCOL_FEATURES,
                          w.GET_QUEUE_NUM, w.GET_MAX_MEM_SLOTS, w.SET_OWNER, w.GET_CONFIG})
# The protocol feature a request needs, and how many fds it carries (None: decided by payload).
GATES = {w.GET_QUEUE_NUM: w.PROTOCOL_F_MQ, w.GET_CONFIG: w.PROTOCOL_F_CONFIG,
         w.SET_CONFIG: w.PROTOCOL_F_CONFIG, w.GET_INFLIGHT_FD: w.PROTOCOL_F_INFLIGHT_SHMFD,
         w.SET_INFLIGHT_FD: w.PROTOCOL_F_INFLIGHT_SHMFD,
         w.GET_MAX_MEM_SLOTS: w.PROTOCOL_F_CONFIGURE_MEM_SLOTS,
         w.ADD_MEM_REG: w.PROTOCOL_F_CONFIGURE_MEM_SLOTS,
         w.REM_MEM_REG: w.PROTOCOL_F_CONFIGURE_MEM_SLOTS,
         w.RESET_DEVICE: w.PROTOCOL_F_RESET_DEVICE}
FDS = {w.ADD_MEM_REG: 1, w.SET_INFLIGHT_FD: 1}
HAS_REPLY = frozenset({w.GET_FEATURES, w.GET_PROTOCOL_FEATURES, w.GET_VRING_BASE,
                       w.GET_QUEUE_NUM, w.GET_CONFIG, w.GET_INFLIGHT_FD, w.GET_MAX_MEM_SLOTS})


class SessionIO(Protocol):
    def watch(self, fd: int, callback: Callable[[], None]) -> None: ...

    def unwatch(self, fd: int) -> None: ...


class Session(RingHandlers):
    def __init__(self, device: VhostDevice, io: SessionIO, log: Any,
                 counters: dict[str, int], offer_config: bool = True) -> None:
        self.device = device
        # The protocol features offered: all of wire.PROTOCOL_FEATURES, less CONFIG for a
        # device whose front-end keeps the config space itself (docs/vhost-user.md).
        self.protocol_offered = w.PROTOCOL_FEATURES if offer_config \
            else w.PROTOCOL_FEATURES & ~(1 << w.PROTOCOL_F_CONFIG)
        self.io = io
        self.log = log
        self.counters = counters
        self.owner = False
        self.offered = device.device_features() | 1 << w.F_PROTOCOL_FEATURES
        self.features = 0  # SET_FEATURES, as sent (bit 30 included)
        self.features_set = False
        self.protocol = 0  # SET_PROTOCOL_FEATURES
        self.memory: VhostMemory | None = None
        self.inflight: InflightRecord | None = None
        self.vrings = [Vring(VhostQueue(n, i)) for i, n in enumerate(device.queue_max_sizes)]
        self.transport = VhostTransport(self.vrings, counters, log, self._device_fault)
        self.closed = False

    # -- entry ------------------------------------------------------------------------------------
    def handle(self, hdr: w.Header, payload: bytes, fds: list[int]) -> list[Reply]:
        """Process one message; its fds are consumed (kept or closed) whatever happens."""
        try:
            replies = self._dispatch(hdr, payload, fds)
        finally:  # memory and inflight fds are mapped by now; eventfds are kept by their ring
            for fd in fds:
                if not self._kept(fd):
                    close_quietly(fd)
        if hdr.need_reply and self.protocol >> w.PROTOCOL_F_REPLY_ACK & 1 \
                and hdr.request not in HAS_REPLY:
            replies.append((w.reply_u64(hdr.request, 0), []))
        return replies

    def _kept(self, fd: int) -> bool:
        return any(fd in (vr.kick_fd, vr.call_fd, vr.err_fd) for vr in self.vrings)

    def _dispatch(self, hdr: w.Header, payload: bytes, fds: list[int]) -> list[Reply]:
        req, name = hdr.request, hdr.name
        if not self.owner and req not in BEFORE_OWNER:
            raise w.MessageError("before_set_owner", f"{name} before SET_OWNER")
        gate = GATES.get(req)
        if gate is not None and not self.protocol >> gate & 1:
            raise w.MessageError("not_negotiated", f"{name} without its protocol feature "
                                                   f"(bit {gate}) negotiated")
        if req in (w.SET_VRING_KICK, w.SET_VRING_CALL, w.SET_VRING_ERR):
            return self._vring_fd(req, name, payload, fds)
        want = FDS.get(req, 0)
        if req == w.SET_MEM_TABLE:
            want = len(w.parse_memory(payload))
        elif req == w.REM_MEM_REG and len(fds) == 1:  # tolerated by the spec: closed unused
            want = 1
        if len(fds) != want:
            raise w.MessageError("missing_fds" if len(fds) < want else "extra_fds",
                                 f"{name} carries {len(fds)} fds, expected {want}")
        handler = getattr(self, f"_on_{name.lower()}", None)
        if handler is None:
            raise w.MessageError("unsupported_request", f"request {name} is not supported")
        result: list[Reply] = handler(name, payload, fds)
        return result

    # -- negotiation ------------------------------------------------------------------------------
    def _on_get_features(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        self._no_payload(name, payload)
        return [(w.reply_u64(w.GET_FEATURES, self.offered), [])]

    def _on_set_features(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        f = w.parse_u64(name, payload)
        if f & ~self.offered:
            raise w.MessageError("features_not_offered", f"{name}: bits {f & ~self.offered:#x} "
                                                         "were not offered")
        if any(vr.started for vr in self.vrings) and f != self.features:
            raise w.MessageError("ring_running", f"{name}: features changed while rings run")
        if not self.device.validate_features(f & ~(1 << w.F_PROTOCOL_FEATURES)):
            raise w.MessageError("features_refused", f"{name}: the device refuses {f:#x}")
        self.features, self.features_set = f, True
        return []

    def _on_get_protocol_features(self, name: str, payload: bytes,
                                  fds: list[int]) -> list[Reply]:
        self._no_payload(name, payload)
        return [(w.reply_u64(w.GET_PROTOCOL_FEATURES, self.protocol_offered), [])]

    def _on_set_protocol_features(self, name: str, payload: bytes,
                                  fds: list[int]) -> list[Reply]:
        p = w.parse_u64(name, payload)
        if p & ~self.protocol_offered:
            raise w.MessageError("features_not_offered", f"{name}: bits "
                                 f"{p & ~self.protocol_offered:#x} were not offered")
        self.protocol = p
        return []

    def _on_set_owner(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        self._no_payload(name, payload)
        self.owner = True  # again for every queue pair of a multiqueue net front-end
        return []

    def _on_reset_owner(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        self._no_payload(name, payload)
        self.stop_all("reset_owner")  # the spec: ignore it or disable every ring
        return []

    def _on_reset_device(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        self._no_payload(name, payload)
        self.stop_all("reset_device")
        self.features, self.features_set = 0, False
        return []

    def _on_get_queue_num(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        self._no_payload(name, payload)
        return [(w.reply_u64(w.GET_QUEUE_NUM, len(self.vrings)), [])]

    def _on_get_max_mem_slots(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        self._no_payload(name, payload)
        return [(w.reply_u64(w.GET_MAX_MEM_SLOTS, MAX_MEM_SLOTS), [])]

    # -- memory -----------------------------------------------------------------------------------
    def _on_set_mem_table(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        regions = w.parse_memory(payload)
        mem = self._memory()
        for s in list(mem.slots):  # replaced as a whole; rings keep their guest addresses
            mem.remove(s.spec)
        for spec, fd in zip(regions, fds):
            mem.add(spec, fd)
        self.counters["memory_regions"] = len(mem.slots)
        return []

    def _on_add_mem_reg(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        self._memory().add(w.parse_mem_reg(name, payload), fds[0])
        self.counters["memory_regions"] = len(self._memory().slots)
        return []

    def _on_rem_mem_reg(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        self._memory().remove(w.parse_mem_reg(name, payload))
        self.counters["memory_regions"] = len(self._memory().slots)
        return []

    def _memory(self) -> VhostMemory:
        if self.memory is None:
            self.memory = VhostMemory()
        return self.memory

    # -- config space -----------------------------------------------------------------------------
    def _on_get_config(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        acc = w.parse_config(name, payload, with_data=False)
        space = self.device.config_bytes().ljust(w.MAX_CONFIG_SIZE, b"\0")
        return [(w.reply_config(w.GET_CONFIG, acc, space[acc.offset:acc.offset + acc.size]), [])]

    def _on_set_config(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        acc = w.parse_config(name, payload, with_data=True)
        pos = 0
        while pos < acc.size:  # the widest aligned access the window would make
            size = next(s for s in (8, 4, 2, 1)
                        if pos + s <= acc.size and (acc.offset + pos) % s == 0)
            value = int.from_bytes(acc.data[pos:pos + size], "little")
            self.device.write_config(acc.offset + pos, size, value)
            pos += size
        return []

    # -- inflight ---------------------------------------------------------------------------------
    def _on_get_inflight_fd(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        info = w.parse_inflight(name, payload)
        self._no_ring_running(name)
        record, fd, desc = InflightRecord.create(info.num_queues, info.queue_size)
        self._set_inflight(record)
        return [(w.reply_inflight(w.GET_INFLIGHT_FD, desc), [fd])]  # the adaptor closes fd

    def _on_set_inflight_fd(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        info = w.parse_inflight(name, payload)
        self._no_ring_running(name)
        self._set_inflight(InflightRecord.from_fd(fds[0], info))
        return []

    def _no_ring_running(self, name: str) -> None:
        if any(vr.started for vr in self.vrings):
            raise w.MessageError("ring_running", f"{name}: inflight record replaced while "
                                                 "rings run")

    def _set_inflight(self, record: InflightRecord) -> None:
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = record

    def _device_fault(self, reason: str) -> None:
        self.counters["device_faults"] += 1
        self.log.warning("vhost_user_device_fault", reason=reason)

    @staticmethod
    def _no_payload(name: str, payload: bytes) -> None:
        if payload:
            raise w.MessageError("bad_size", f"{name}: payload of {len(payload)} bytes, "
                                             "expected none")

    # -- teardown ---------------------------------------------------------------------------------
    def close(self) -> None:
        """The connection is gone: stop everything, unmap memory, close every fd we hold."""
        if self.closed:
            return
        self.closed = True
        try:
            self.stop_all("disconnect")
        finally:
            for vr in self.vrings:
                if vr.kick_fd is not None:
                    self.io.unwatch(vr.kick_fd)
                vr.close_fds()
                vr.queue.reset()
            if self.inflight is not None:
                self.inflight.close()
                self.inflight = None
            if self.memory is not None:
                self.memory.close()
                self.memory = None
