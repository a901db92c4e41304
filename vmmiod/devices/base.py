"""The contract between a virtio device and its transport (the virtio-mmio window).

A device knows its features, its config space, its queues' maximum sizes and its backend. It
does not know registers or hypervisors: the window (vmmiod/mmio.py) calls it through the methods
below and it answers through the narrow `Transport` interface (used-buffer interrupt, config
change, fault). Guest memory and the SplitQueues arrive at `activate()` (DRIVER_OK) and are gone
after `reset()`.

Queue work never runs inside the IOREQ: `queue_notify()` only schedules `process_queue()` on
the event loop, so the adaptor can complete the vCPU's access first (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

import structlog

from vmmiod.memory import GuestMemory, GuestMemoryError
from vmmiod.transport import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    Transport,
    bit,
)
from vmmiod.virtqueue import DescriptorChain, SplitQueue, VirtqueueError


def queue_fault_reason(index: int, exc: Exception) -> str:
    """`exc` as a fault reason that names its queue once: virtqueue errors already start with
    "queue N:", guest-memory errors do not."""
    return str(exc) if isinstance(exc, VirtqueueError) else f"queue {index}: {exc}"


class BackendError(Exception):
    """A backend could not be opened (image missing or locked, TAP refused, socket in use).

    Raised by `VirtioDevice.open()`; the message names the device and says what to do. The
    daemon logs it and exits with `exit_code` before serving anything.
    """

    exit_code = 69  # EX_UNAVAILABLE


class VirtioDevice:
    """Base class of block, net and console. Subclasses fill the class attributes and hooks."""

    device_id: ClassVar[int] = 0
    type_name: ClassVar[str] = "virtio"

    def __init__(self, device_name: str, queue_max_sizes: Sequence[int],
                 *, access_platform: bool = False, log: Any = None) -> None:
        self.name = device_name
        self.queue_max_sizes: tuple[int, ...] = tuple(queue_max_sizes)
        self.access_platform = access_platform
        self.log = log if log is not None else structlog.get_logger().bind(device=device_name)
        self.memory: GuestMemory | None = None
        self.queues: list[SplitQueue] = []
        self.driver_features = 0
        self.transport: Transport | None = None
        self.active = False
        self.failed = False
        self.counters: dict[str, int] = {"notifications": 0, "interrupts": 0}
        # Per queue: QueueNotify writes, process_queue runs (loop wake-ups for that queue's
        # work) and interrupts asked for; reported as notifications_q<i>, runs_q<i>, ...
        n = len(self.queue_max_sizes)
        self.queue_notifies = [0] * n
        self.queue_runs = [0] * n
        self.queue_interrupts = [0] * n
        self._pending: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Chains a dead daemon left in flight (resume()), served before the ring's next ones.
        self._resumed: dict[int, deque[DescriptorChain]] = {}
        self._resumed_out: dict[int, DescriptorChain] = {}

    # -- what the window asks -------------------------------------------------------------------
    def device_features(self) -> int:
        """Every feature bit offered. Subclasses add theirs to this base set."""
        f = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
        if self.access_platform:
            f |= bit(VIRTIO_F_ACCESS_PLATFORM)
        return f

    def validate_features(self, features: int) -> bool:
        """Called at FEATURES_OK with the driver's (already masked) set. False refuses it.

        The transport checks its own rules (VERSION_1 on a version-2 window); this hook is for
        device rules (e.g. a feature that depends on another).
        """
        return True

    def config_bytes(self) -> bytes:
        """The device-specific config space as it is now."""
        return b""

    def read_config(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset < 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Driver writes to config space. Default: ignored (read-only config)."""

    # -- lifecycle --------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the backend (files, sockets, TAP). Called once by the daemon before serving."""

    async def close(self) -> None:
        """Flush and close the backend. Called once by the daemon at shutdown."""

    def reopen(self) -> None:
        """SIGHUP: reopen log-like outputs (console file backend) for log rotation."""

    def activate(self, memory: GuestMemory, queues: list[SplitQueue], features: int,
                 transport: Transport) -> None:
        """DRIVER_OK: the queues that the driver made ready are configured and valid."""
        self.memory = memory
        self.queues = queues
        self.driver_features = features
        self.transport = transport
        self.active = True
        self.failed = False
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self.on_activate()

    def reset(self) -> None:
        """Status 0 (or a VMM disconnect): stop all queue work, forget guest memory."""
        was_active = self.active
        self.active = False
        self._pending.clear()
        self._resumed.clear()
        self.on_reset()
        self.memory = None
        self.queues = []
        self.driver_features = 0
        self.transport = None
        if was_active:
            self.log.info("device_reset")

    def on_activate(self) -> None:
        """Subclass hook: start backend readers etc."""

    def on_reset(self) -> None:
        """Subclass hook: stop backend readers, drop in-flight state (complete nothing)."""

    def on_queue_reset(self, index: int) -> None:
        """One queue was disabled or reset (QueueReady=0, QueueReset): drop its held chains."""
        self._pending.discard(index)
        self._resumed.pop(index, None)

    # -- restart (docs/restart.md) ------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """What the guest set up in the device beyond the transport (JSON-able), for the record."""
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        """After activate() on resume: take back what export_state() gave (untrusted file)."""

    def record_bytes(self) -> int:
        """Bytes of the state record the device keeps for itself (attach_record_area())."""
        return 0

    def attach_record_area(self, area: memoryview) -> None:
        """The device's own part of the state record, as the last instance left it."""

    def state_changed(self) -> None:
        """export_state() changed: record it before the guest can see the effect."""
        state = getattr(self.transport, "state", None)  # the window's (vmmiod/mmio_state.py)
        if state is not None:
            state.save()

    def resume(self, chains: dict[int, list[DescriptorChain]]) -> None:
        """After activate() and import_state() on resume: the chains the dead daemon had in
        flight, per queue. Default: served first by pop_chain(), then every queue is run."""
        for index, found in chains.items():
            if found:
                self._resumed.setdefault(index, deque()).extend(found)
        for index, q in enumerate(self.queues):
            if q.ready:
                self.queue_notify(index)

    def pop_chain(self, index: int) -> DescriptorChain | None:
        """The next chain of queue `index`: a resumed one first, then the ring's."""
        held = self._resumed.get(index)
        if held:
            chain = held.popleft()
            self._resumed_out[index] = chain
            return chain
        self._resumed_out.pop(index, None)
        return self.queues[index].pop()

    def unpop_chain(self, index: int, chain: DescriptorChain) -> None:
        """Give back the chain pop_chain() just returned (the backend could not take it)."""
        if self._resumed_out.get(index) is chain:
            self._resumed.setdefault(index, deque()).appendleft(chain)
        else:
            self.queues[index].undo_pop(chain)

    def has_feature(self, n: int) -> bool:
        return bool(self.driver_features >> n & 1)

    # -- queue work -----------------------------------------------------------------------------
    def _notified(self, index: int) -> bool:
        """Count a notification; True when queue `index` may run now (active, not failed)."""
        self.counters["notifications"] += 1
        if not self.active or index >= len(self.queues) or self.failed:
            return False
        if index < len(self.queue_notifies):
            self.queue_notifies[index] += 1
        return True

    def queue_notify(self, index: int) -> None:
        """QueueNotify from the window (inside the IOREQ): schedule, never process here."""
        if not self._notified(index) or index in self._pending:
            return
        self._pending.add(index)
        if self._loop is not None:
            self._loop.call_soon(self._run_queue, index)
        else:  # no loop (sans-IO tests): run at once
            self._run_queue(index)

    def queue_kicked(self, index: int) -> None:
        """A notification from outside any vCPU exit (a vhost-user kick eventfd's reader
        callback): the queue is drained at once, in that callback, without the call_soon hop
        and the extra loop turn of `queue_notify`. A run already scheduled keeps its turn."""
        if self._notified(index) and index not in self._pending:
            self._run_queue(index)

    def _run_queue(self, index: int) -> None:
        self._pending.discard(index)
        if not self.active or self.failed or index >= len(self.queues):
            return
        if not self.queues[index].ready:  # disabled or reset since the notify was scheduled
            return
        if index < len(self.queue_runs):
            self.queue_runs[index] += 1
        try:
            self.process_queue(index)
        except (VirtqueueError, GuestMemoryError) as exc:
            self.fault(queue_fault_reason(index, exc), queue=index, error=type(exc).__name__)

    def process_queue(self, index: int) -> None:
        """Subclass hook: drain queue `index` (pop chains, do I/O, add used, notify)."""

    def notify_used(self, index: int) -> None:
        """Publish the used ring of queue `index` and interrupt the driver if it wants one."""
        if self.publish_used(index):
            self.interrupt(index)

    def notify_used_one(self, index: int, head: int, length: int) -> None:
        """`add_used` then `notify_used` for one element (a lone completion), the queue's part
        in one call (`add_used_publish`)."""
        if self._wants_interrupt(index, self.queues[index].add_used_publish(head, length)):
            self.interrupt(index)

    def publish_used(self, index: int) -> bool:
        """Publish the used ring of queue `index`; True when the driver wants an interrupt.

        A device that publishes several queues in one go (net: a transmit batch and the
        replies it brought) calls `interrupt()` once for all of them.
        """
        return self._wants_interrupt(index, self.queues[index].publish_used())

    def _wants_interrupt(self, index: int, wanted: bool) -> bool:
        """A publish's answer, counted: True when the driver wants an interrupt and there is
        a transport to send it."""
        if not wanted or self.transport is None:
            return False
        if index < len(self.queue_interrupts):
            self.queue_interrupts[index] += 1
        return True

    def interrupt(self, index: int) -> None:
        """Tell the driver that queue `index` (and any other published with it) has used buffers."""
        if self.transport is not None:
            self.counters["interrupts"] += 1
            self.transport.signal_used(index)

    def fault(self, reason: str, **context: Any) -> None:
        """The guest broke the protocol: log it, stop the device, ask for a reset."""
        if self.failed:
            return
        self.failed = True
        self.counters["violations"] = self.counters.get("violations", 0) + 1
        self.log.warning("guest_protocol_violation", reason=reason, **context)
        self.on_reset()
        if self.transport is not None:
            self.transport.device_fault(reason)

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        for i, (notified, runs, interrupts) in enumerate(zip(
                self.queue_notifies, self.queue_runs, self.queue_interrupts, strict=True)):
            out[f"notifications_q{i}"] = notified
            out[f"runs_q{i}"] = runs
            out[f"interrupts_q{i}"] = interrupts
        return out
