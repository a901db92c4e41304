"""One vhost-user vring: what the front-end set (size, addresses, base, eventfds, enable), the
SplitQueue the device drains, and the inflight bookkeeping around it.

`VhostQueue` is a SplitQueue that also writes the inflight record (inflight.py) as chains are
popped (one by one or as a batch: `pop_tables`), returned and published, and that hands out
the chains a killed predecessor left in flight before any new one. Everything else about the
ring (every rule of VIRTIO 2.7) is the SplitQueue's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from vmmiod.hypervisors.vhost_user.inflight import QueueInflight
from vmmiod.virtqueue import DescriptorChain, SplitQueue
from vmmiod.virtqueue.batch import Table

EVENTFD_ONE = (1).to_bytes(8, "little")


class VhostQueue(SplitQueue):
    """A SplitQueue with the inflight record kept up to date (when the front-end gave one)."""

    def __init__(self, max_size: int, index: int = 0) -> None:
        self.inflight: QueueInflight | None = None
        self.resubmit: list[int] = []
        self.outstanding: dict[int, None] = {}  # heads popped and not returned, in pop order
        self._last_head = -1
        super().__init__(max_size, index)

    def reset(self) -> None:
        super().reset()
        self.inflight = None
        self.resubmit = []
        self.outstanding = {}
        self._last_head = -1

    def pop(self) -> DescriptorChain | None:
        chain = self._pop_resubmit() if self.resubmit else SplitQueue.pop(self)
        if chain is not None:
            self._last_head = head = chain.head
            self.outstanding[head] = None
            inflight = self.inflight
            if inflight is not None:
                inflight.popped(head)
        return chain

    def drained(self) -> bool:
        return not self.resubmit and SplitQueue.drained(self)

    def pop_tables(self, limit: int) -> list[Table]:
        if self.resubmit:
            return []  # what a predecessor left in flight comes first, through pop()
        popped = super().pop_tables(limit)
        for head, _table in popped:
            self.outstanding[head] = None
            if self.inflight is not None:
                self.inflight.popped(head)
        if popped:
            self._last_head = popped[-1][0]
        return popped

    def _pop_resubmit(self) -> DescriptorChain:
        """A chain the previous back-end had popped and not returned (inflight record)."""
        self._check_generation()
        head = self.resubmit.pop(0)
        chain = self._walk(head)
        self._in_flight[head] = 1
        chain.generation = self.generation
        return chain

    def undo_pop(self, *args: Any) -> None:
        super().undo_pop(*args)
        self.outstanding.pop(self._last_head, None)
        if self.inflight is not None and 0 <= self._last_head < self.size:
            self.inflight.unpopped(self._last_head)

    def add_used(self, head: int, length: int, generation: int | None = None) -> bool:
        done = SplitQueue.add_used(self, head, length, generation)
        if done:
            self.outstanding.pop(head, None)
            inflight = self.inflight
            if inflight is not None:
                inflight.used(head)
        return done

    def add_used_run(self, elems: list[int]) -> None:
        SplitQueue.add_used_run(self, elems)
        outstanding, inflight = self.outstanding, self.inflight
        for head in elems[0::2]:
            outstanding.pop(head, None)
            if inflight is not None:
                inflight.used(head)

    def add_used_publish(self, head: int, length: int) -> bool:
        """A lone completion (queue depth 1): add_used and publish_used written out, the
        inflight record's steps in their places (the batch link before used.idx moves, the
        marks cleared after), in one call instead of four."""
        SplitQueue.add_used(self, head, length)
        inflight = self.inflight
        if inflight is not None:
            inflight.used(head)
        ready = self.ready
        want = SplitQueue.publish_used(self)
        if inflight is not None and ready:
            inflight.published(self.next_used)
        self.outstanding.pop(head, None)
        return want

    def resume_base(self) -> tuple[int, int]:
        """(base, given back): the avail index a restarted ring should resume from.

        Chains popped and never returned (a device reset drops them) are given back when they
        are the last ones popped: the ring resumes at their avail slots and pops them again.
        Out of order (a later chain returned before them) they cannot be: only the inflight
        record can redo them then. Reads the avail ring: may raise GuestMemoryError.
        """
        k = len(self.outstanding)
        if k == 0 or self.resubmit or self.memory is None:
            return self.next_avail, 0
        start = (self.next_avail - k) & 0xFFFF
        slots = {self.memory.read_u16(self.avail_addr + 4 + 2 * ((start + i) % self.size))
                 for i in range(k)}
        if slots != set(self.outstanding):
            return self.next_avail, 0
        return start, k

    def publish_used(self) -> bool:
        inflight = self.inflight
        if inflight is None:
            return SplitQueue.publish_used(self)
        ready = self.ready
        notify = SplitQueue.publish_used(self)
        if ready:
            inflight.published(self.next_used)
        return notify


@dataclass
class Vring:
    """The front-end's settings for one ring, and its state (stopped/started, enabled)."""

    queue: VhostQueue
    num: int = 0
    desc_uva: int = 0
    used_uva: int = 0
    avail_uva: int = 0
    base: int = 0  # SET_VRING_BASE: next avail index to process
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    kick_polling: bool = False  # SET_VRING_KICK with the no-fd flag
    addr_set: bool = False
    started: bool = False
    enabled: bool = False
    kicks_waiting: bool = False  # a kick while disabled: delivered on enable
    counters: dict[str, int] = field(default_factory=lambda: {"kicks": 0, "calls": 0,
                                                              "calls_dropped": 0})

    def set_fd(self, which: str, fd: int | None) -> None:
        old = getattr(self, which)
        if old is not None and old != fd:
            close_quietly(old)
        setattr(self, which, fd)

    def signal(self, which: str) -> bool:
        fd = getattr(self, which)
        if fd is None:
            return False
        try:
            os.write(fd, EVENTFD_ONE)
            return True
        except OSError:  # counter full (the front-end does not read it) or a closed fd
            return False

    def close_fds(self) -> None:
        for which in ("kick_fd", "call_fd", "err_fd"):
            self.set_fd(which, None)


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
