"""The vring messages of a vhost-user session: SET_VRING_*, GET_VRING_BASE, kicks, and the
start and stop of a ring (a mixin of session.Session, kept apart to keep each module to one job).

A ring starts at SET_VRING_KICK: its user addresses are translated through the memory table,
the SplitQueue checks sizes, alignment and that every part lies in guest memory, the inflight
record (when the front-end gave one) says where to resume and what to redo; the device is
activated with its first ring. GET_VRING_BASE stops a ring: the device drops what it holds for
it and the queue takes a new generation, so late completions never reach the new ring.
"""

from __future__ import annotations

import os
from typing import Any

from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.hypervisors.vhost_user.device import VhostDevice, VhostTransport
from vmmiod.hypervisors.vhost_user.inflight import InflightInvalid, InflightRecord
from vmmiod.hypervisors.vhost_user.memtable import VhostMemory
from vmmiod.hypervisors.vhost_user.vring import Vring
from vmmiod.memory import GuestMemoryError
from vmmiod.virtqueue import VirtqueueError
from vmmiod.virtqueue.split import avail_ring_size, desc_table_size, used_ring_size

VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
EVENTFD_LINK = "anon_inode:[eventfd]"
Reply = tuple[bytes, list[int]]


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == EVENTFD_LINK
    except OSError:
        return False


class RingHandlers:
    device: VhostDevice
    io: Any  # session.SessionIO
    log: Any
    counters: dict[str, int]
    features: int
    memory: VhostMemory | None
    inflight: InflightRecord | None
    vrings: list[Vring]
    transport: VhostTransport

    # -- vrings -----------------------------------------------------------------------------------
    def _vring(self, name: str, index: int) -> Vring:
        if index >= len(self.vrings):
            raise w.MessageError("bad_vring_index", f"{name}: ring {index}, the device has "
                                                    f"{len(self.vrings)}")
        return self.vrings[index]

    def _stopped(self, name: str, index: int) -> Vring:
        vr = self._vring(name, index)
        if vr.started:
            raise w.MessageError("ring_running", f"{name}: ring {index} is running")
        return vr

    def _on_set_vring_num(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        index, num = w.parse_state(name, payload)
        vr = self._stopped(name, index)
        if not 1 <= num <= vr.queue.max_size or num & (num - 1):
            raise w.MessageError("bad_vring_num", f"{name}: ring {index} size {num} (a power "
                                                  f"of two up to {vr.queue.max_size})")
        vr.num = num
        return []

    def _on_set_vring_addr(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        a = w.parse_addr(payload)
        vr = self._stopped(name, a.index)
        if a.flags & w.VRING_F_LOG:
            raise w.MessageError("unsupported_request", f"{name}: used-ring logging asked, "
                                                        "VHOST_F_LOG_ALL was not offered")
        vr.desc_uva, vr.used_uva, vr.avail_uva, vr.addr_set = a.desc, a.used, a.avail, True
        return []

    def _on_set_vring_base(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        index, num = w.parse_state(name, payload)
        vr = self._stopped(name, index)
        if num > 0xFFFF:
            raise w.MessageError("bad_vring_base", f"{name}: base {num} for a split ring")
        vr.base = num
        return []

    def _on_get_vring_base(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        index, _ = w.parse_state(name, payload)
        self._vring(name, index)
        self._stop(index)
        return [(w.reply_state(w.GET_VRING_BASE, index, self.vrings[index].base), [])]

    def _on_set_vring_enable(self, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        index, num = w.parse_state(name, payload)
        vr = self._vring(name, index)
        if num not in (0, 1):
            raise w.MessageError("bad_vring_enable", f"{name}: ring {index} state {num}")
        vr.enabled = bool(num)
        if vr.enabled and vr.started and vr.kicks_waiting:
            vr.kicks_waiting = False
            self.device.queue_notify(index)
        return []

    def _vring_fd(self, req: int, name: str, payload: bytes, fds: list[int]) -> list[Reply]:
        u = w.parse_u64(name, payload)
        if u & ~(w.VRING_IDX_MASK | w.VRING_NOFD):
            raise w.MessageError("bad_vring_fd_flags", f"{name}: {u:#x} sets unknown bits")
        index, nofd = u & w.VRING_IDX_MASK, bool(u & w.VRING_NOFD)
        vr = self._vring(name, index)
        if len(fds) != (0 if nofd else 1):
            raise w.MessageError("missing_fds" if len(fds) < (0 if nofd else 1) else "extra_fds",
                                 f"{name}: {len(fds)} fds with the no-fd flag "
                                 f"{'set' if nofd else 'clear'}")
        fd = None if nofd else fds[0]
        if fd is not None:
            if not is_eventfd(fd):
                raise w.MessageError("bad_eventfd", f"{name}: ring {index}: not an eventfd")
            os.set_blocking(fd, False)  # never block on the front-end's counter
        if req == w.SET_VRING_CALL:
            vr.set_fd("call_fd", fd)
        elif req == w.SET_VRING_ERR:
            vr.set_fd("err_fd", fd)
        else:
            if fd is None:
                raise w.MessageError("unsupported_request", f"{name}: ring {index}: polling "
                                                            "(no kick fd) is not supported")
            if vr.kick_fd is not None:
                self.io.unwatch(vr.kick_fd)
            vr.set_fd("kick_fd", fd)
            self.io.watch(fd, lambda: self._on_kick(index))
            if not vr.started:
                self._start(index)
        return []

    def _on_kick(self, index: int) -> None:
        vr = self.vrings[index]
        if vr.kick_fd is None:
            return
        try:
            os.read(vr.kick_fd, 8)
        except OSError:  # EAGAIN: a spurious wake-up
            return
        vr.counters["kicks"] += 1
        self.counters["kicks"] += 1
        if not vr.started:
            return
        if not vr.enabled:
            vr.kicks_waiting = True
            return
        self.device.queue_kicked(index)  # drained here, in the kick fd's callback

    def _start(self, index: int) -> None:
        vr = self.vrings[index]
        mem = self.memory
        if mem is None or not mem.slots:
            raise w.MessageError("ring_not_configured", f"ring {index} started with no memory")
        if not vr.addr_set:
            raise w.MessageError("ring_not_configured", f"ring {index} started with no address")
        q = vr.queue
        q.reset()
        q.size = vr.num or q.max_size
        q.desc_addr = mem.uva_to_gpa(vr.desc_uva, desc_table_size(q.size), "descriptor table")
        q.avail_addr = mem.uva_to_gpa(vr.avail_uva, avail_ring_size(q.size), "avail ring")
        q.used_addr = mem.uva_to_gpa(vr.used_uva, used_ring_size(q.size), "used ring")
        f = self.features
        try:
            q.activate(mem, event_idx=bool(f >> VIRTIO_F_EVENT_IDX & 1),
                       indirect=bool(f >> VIRTIO_F_INDIRECT_DESC & 1))
            used_idx = mem.read_u16(q.used_addr + 2)
        except (VirtqueueError, GuestMemoryError) as exc:
            q.reset()
            raise w.MessageError("ring_outside_memory", f"ring {index}: {exc}") from exc
        next_avail = vr.base
        if self.inflight is not None and index < self.inflight.num_queues:
            q.inflight = self.inflight.queues[index]
            try:
                resumed = q.inflight.start(q.size, used_idx)
            except InflightInvalid as exc:
                q.inflight.buf[:] = bytes(len(q.inflight.buf))
                try:
                    resumed = q.inflight.start(q.size, used_idx)
                except InflightInvalid:
                    # A record too small for the ring (QEMU sizes it by its own queue-size):
                    # serve the ring without one; only a restart's redo is lost.
                    q.inflight, resumed = None, None
                self.log.warning("vhost_user_inflight_invalid", queue=index, error=str(exc),
                                 recorded=q.inflight is not None)
            if resumed is not None:
                next_avail, q.resubmit = resumed
                self.log.info("vhost_user_inflight_resumed", queue=index, used_idx=used_idx,
                              next_avail=next_avail, resubmit=len(q.resubmit))
        q.set_indices(next_avail, used_idx)
        vr.started = True
        if not self.features >> w.F_PROTOCOL_FEATURES & 1:
            vr.enabled = True  # without protocol features rings start enabled
        if not self.device.active:
            self.device.activate(mem, [v.queue for v in self.vrings],
                                 self.features & ~(1 << w.F_PROTOCOL_FEATURES), self.transport)
        self.log.info("vhost_user_ring_started", queue=index, size=q.size, base=next_avail,
                      used_idx=used_idx, enabled=vr.enabled)
        if vr.enabled:
            self.device.queue_notify(index)  # what arrived while nobody served the ring
        else:
            vr.kicks_waiting = True

    def _stop(self, index: int) -> None:
        """Stop a ring (GET_VRING_BASE, a reset, a disconnect); `vr.base` is where it resumes."""
        vr = self.vrings[index]
        if vr.kick_fd is not None:
            self.io.unwatch(vr.kick_fd)
        vr.set_fd("kick_fd", None)
        if vr.started:
            vr.started = False
            q = vr.queue
            self.device.on_queue_reset(index)  # the device lets go of what it holds
            try:
                if q.publish_used():  # what the device returned is the driver's
                    self.transport.signal_used(index)
                vr.base, given_back = q.resume_base()
            except (VirtqueueError, GuestMemoryError):
                vr.base, given_back = q.next_avail, 0
            q.reset()  # a new generation: completions of the old ring are dropped
            self.log.info("vhost_user_ring_stopped", queue=index, base=vr.base,
                          given_back=given_back)
        vr.set_fd("call_fd", None)
        vr.kicks_waiting = False
        if self.device.active and not any(v.started for v in self.vrings):
            self.device.reset()

    def stop_all(self, why: str) -> None:
        for i in range(len(self.vrings)):
            self._stop(i)
        for vr in self.vrings:
            vr.enabled = False
        if self.device.active:
            self.device.reset()
