"""Receive chains a virtio-net device holds, as one ready-made iovec.

With MRG_RXBUF the device must be able to take the largest frame the guest may get (64 KiB
with GUEST_TSO) before it reads, so it holds enough posted chains to cover that and reads
into all of them at once: the frame fills them in order. Frames use the front chains, refills
append at the back, so the flattened list of writable views is kept up to date incrementally
instead of being rebuilt per frame (a 64-byte frame would otherwise pay for ~40 chains).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from vmmiod.virtqueue import DescriptorChain, SplitQueue

IOV_MAX = 1024  # Linux's UIO_MAXIOV; one iovec stays free for the backend's overflow buffer


class RxHeld:
    """Chains popped from the receive queue and not yet returned, in ring order."""

    def __init__(self) -> None:
        self.chains: deque[DescriptorChain] = deque()
        self.caps: deque[int] = deque()  # usable bytes per chain
        self.nviews: deque[int] = deque()  # entries per chain in `iov`
        self.iov: list[memoryview] = []
        self.cap = 0  # bytes `iov` covers
        self.gen = -1  # guest memory generation the views were looked up in

    def __len__(self) -> int:
        return len(self.chains)

    def clear(self) -> None:
        self.chains.clear()
        self.caps.clear()
        self.nviews.clear()
        self.iov = []
        self.cap = 0

    def add(self, chain: DescriptorChain) -> None:
        room = IOV_MAX - 1 - len(self.iov)
        cap = chain.writable_len
        writable = chain.writable
        if room <= 0:  # the iovec is full: the chain is held but can take nothing
            views = []
            cap = 0
        elif len(writable) == 1 and cap:  # the usual receive buffer: one descriptor
            views = chain.memory.views(writable[0][0], cap, True)
        else:
            views = chain.writable_views()
        if len(views) > room:
            del views[room:]  # a scatter list no iovec can carry: use the part that fits
            cap = sum(len(v) for v in views)
        self.chains.append(chain)
        self.caps.append(cap)
        self.nviews.append(len(views))
        self.iov.extend(views)
        self.cap += cap

    def can_read(self, mrg_rxbuf: bool, need: int, ring_size: int) -> bool:
        """The held chains can take the largest frame (`need` bytes), or are all there will be.

        With MRG_RXBUF a frame read into too little room is lost, so the device waits for the
        guest to post enough, unless the ring can give no more (every descriptor held, or the
        iovec full): then it reads and drops what does not fit rather than stall. Without it
        one chain is enough (the guest posts chains of the largest size).
        """
        if not mrg_rxbuf:
            return bool(self.chains)
        return self.cap >= need or len(self.chains) >= ring_size or self.full()

    def full(self) -> bool:
        """No further chain can add room: the iovec is at its limit."""
        return len(self.iov) >= IOV_MAX - 1

    def refresh(self, gen: int) -> None:
        """Look every view up again when guest memory was remapped (Xen invalidate)."""
        if gen == self.gen:
            return
        chains = list(self.chains)
        self.clear()
        self.gen = gen
        for c in chains:
            self.add(c)

    def first_cap(self) -> int:
        return self.caps[0]

    def first_views(self) -> list[memoryview]:
        return self.iov[:self.nviews[0]]

    def take(self, length: int) -> list[tuple[int, int]]:
        """Remove the front chains that `length` bytes filled: [(head, bytes in it), ...]."""
        out = []
        drop = 0
        while length > 0:
            cap = self.caps.popleft()
            chain = self.chains.popleft()
            drop += self.nviews.popleft()
            used = min(cap, length)
            out.append((chain.head, used))
            length -= used
            self.cap -= cap
        del self.iov[:drop]
        return out


def ring_unbalanced(q: SplitQueue, held: int) -> int:
    """Chains popped and neither returned nor held (0 when the device's books balance).

    Every pop is either given back (undo_pop), returned (add_used) or held by the device, so
    next_avail - next_used equals the chains held. Anything else means a head could reach the
    used ring twice or never: checked once per batch, it costs two subtractions.
    """
    return ((q.next_avail - q.next_used) & 0xFFFF) - held


INCONSISTENCIES_LOGGED = 10  # then only the counter grows


def report_inconsistency(log: Any, counters: dict[str, int], q: SplitQueue,
                         **context: int) -> None:
    """The device's own ring bookkeeping does not add up: say so loudly, since it may return a
    head the driver does not have in flight (Linux: "id N is not a head!")."""
    counters["inconsistencies"] += 1
    if counters["inconsistencies"] <= INCONSISTENCIES_LOGGED:
        log.warning("virtqueue_inconsistency", queue=q.index, next_avail=q.next_avail,
                    next_used=q.next_used, **context)


def count_drop(log: Any, counters: dict[str, int], direction: str, reason: str) -> None:
    """Count a dropped frame; the first of each kind is logged, the counters tell the rest."""
    key = f"{direction}_dropped_{reason}"
    counters[key] += 1
    if counters[key] == 1:
        log.info("net_frame_dropped", direction=direction, reason=reason)
