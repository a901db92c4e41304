"""virtio-net's receive path: frames from the backend into the guest's posted chains.

Receive runs only while the guest has buffers posted: the backend fd is watched (add_reader)
while the device holds or can pop receive chains, and unwatched otherwise, so a flood waits in
the kernel's bounded TAP/socket queue, never in the daemon. Frames are read (os.readv /
recvmsg_into) straight into the writable views of the held chains, header in place. A frame
that does not fit what the guest posted is dropped and counted.

The chains the device holds are one ready-made iovec (RxHeld). With MRG_RXBUF the device must be able to take the largest frame the guest may get (64 KiB
with GUEST_TSO) before it reads, so it holds enough posted chains to cover that and reads
into all of them at once: the frame fills them in order. Frames use the front chains, refills
append at the back, so the flattened list of writable views is kept up to date incrementally
instead of being rebuilt per frame (a 64-byte frame would otherwise pay for ~40 chains).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from vmmiod.devices.base import queue_fault_reason
from vmmiod.devices.net_ctrl import RxFilter
from vmmiod.devices.net_dgram import RECV_FOREIGN
from vmmiod.devices.net_proto import (
    ETH_ALEN,
    ETH_HLEN,
    NET_HDR_LEN,
    NUM_BUFFERS_OFFSET,
    U16,
    NetBackendIO,
    RxDrop,
    gather,
    scatter,
)
from vmmiod.memory import GuestMemoryError
from vmmiod.virtqueue import DescriptorChain, SplitQueue, VirtqueueError

IOV_MAX = 1024  # Linux's UIO_MAXIOV; one iovec stays free for the backend's overflow buffer
RX_QUEUE = 0
# Frames per wake-up before yielding the loop to the other devices.
RX_BUDGET = 128


class NetPathHost(Protocol):
    """What the receive and transmit paths use of their device (vmmiod/devices/net.py)."""

    counters: dict[str, int]
    log: Any
    backend: NetBackendIO
    rx_filter: RxFilter
    mac: bytes
    hdr_len: int
    mrg_rxbuf: bool
    driver_features: int
    _loop: asyncio.AbstractEventLoop | None

    @property
    def opened(self) -> bool: ...

    def ready_queue(self, index: int) -> SplitQueue | None: ...

    def guarded(self, fn: Callable[[], None], index: int) -> None: ...

    def reschedule(self, index: int) -> None: ...

    def publish_used(self, index: int) -> bool: ...

    def interrupt(self, index: int) -> None: ...

    def fault(self, reason: str, **context: Any) -> None: ...

    def inconsistent(self, q: SplitQueue, **context: int) -> None: ...

    def pop_chain(self, index: int) -> DescriptorChain | None: ...

    def unpop_chain(self, index: int, chain: DescriptorChain) -> None: ...


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


class NetReceiver:
    """The receive queue's work: watch the backend while chains are posted, fill them."""

    def __init__(self, host: NetPathHost) -> None:
        self.host = host
        self.held = RxHeld()
        self.need = 0  # the largest frame the backend may hand the guest, header included
        self.filtering = False  # CTRL_RX negotiated: frames pass the driver's filter
        self.reading = False  # the backend fd is watched

    def start(self) -> None:
        h = self.host
        q = h.ready_queue(RX_QUEUE)
        if self.reading or q is None or not h.opened or h._loop is None or h.backend.fd < 0:
            return
        if not self.can_read(q) and not q.has_available() and not q.enable_notification():
            return  # wait for the guest's next receive-queue notification
        q.disable_notification()
        h._loop.add_reader(h.backend.fd, h.guarded, self.ready, RX_QUEUE)
        self.reading = True

    def stop(self) -> None:
        if self.reading:
            self.reading = False
            h = self.host
            if h._loop is not None and h.backend.fd >= 0:
                h._loop.remove_reader(h.backend.fd)

    def can_read(self, q: SplitQueue) -> bool:  # room for the largest frame, or all
        return self.held.can_read(self.host.mrg_rxbuf, self.need, q.size)

    def fill(self, q: SplitQueue) -> bool:
        """Hold enough posted chains for the next frame; False: wait for the guest to post."""
        held = self.held
        held.refresh(q.memory.generation if q.memory is not None else 0)
        mrg = self.host.mrg_rxbuf
        want = self.need if mrg else 1
        chains = held.chains
        while (held.cap < want if mrg else not chains) and len(chains) < q.size \
                and not held.full():
            chain = q.pop()
            if chain is None:
                break
            # Each buffer must at least hold the header (5.1.6.3.1), and carry nothing to read.
            if chain.readable or chain.writable_len < self.host.hdr_len:
                self.drop(RxDrop.BAD_BUFFER)
                q.add_used(chain.head, 0)
                continue
            held.add(chain)
        return self.can_read(q)

    def drop(self, reason: RxDrop) -> None:
        count_drop(self.host.log, self.host.counters, "rx", reason.value)

    def ready(self) -> None:
        self.host.counters["rx_wakeups"] += 1  # the backend fd became readable: one wake-up
        if self.drain():
            self.host.interrupt(RX_QUEUE)

    def drain(self) -> bool:
        """Receive what the backend has queued; True when the driver wants an interrupt."""
        h = self.host
        q = h.ready_queue(RX_QUEUE)
        if q is None:
            self.stop()
            return False
        start = q.next_used
        want = False
        try:
            for _ in range(RX_BUDGET):
                if not self.fill(q):
                    self.stop()
                    if q.enable_notification():  # buffers arrived while we looked
                        h.reschedule(RX_QUEUE)
                    break
                self.one(q)
        except BlockingIOError:
            pass
        except OSError as exc:
            self.stop()
            h.log.warning("net_backend_error", op="receive", error=str(exc))
        finally:
            if q.next_used != start:
                want = h.publish_used(RX_QUEUE)
            if ring_unbalanced(q, len(self.held)):
                h.inconsistent(q, held=len(self.held))
        return want

    def poll(self) -> bool:
        """Drain outside the fd callback (after a transmit batch), with the fault handling."""
        try:
            return self.drain()
        except (VirtqueueError, GuestMemoryError) as exc:
            self.host.fault(queue_fault_reason(RX_QUEUE, exc), queue=RX_QUEUE,
                            error=type(exc).__name__)
            return False

    def one(self, q: SplitQueue) -> None:
        """Receive one frame into the held chains (BlockingIOError when none is queued)."""
        h = self.host
        held = self.held
        hdr_len = h.hdr_len
        iov, cap = held.iov, held.cap
        n = h.backend.recv(iov, cap, hdr_len)  # may append to iov for the call; restores it
        if n == RECV_FOREIGN:
            self.drop(RxDrop.FOREIGN_SENDER)
            return
        if n > cap:
            self.drop(RxDrop.TOO_BIG)
            return
        if n < hdr_len + ETH_HLEN:
            self.drop(RxDrop.RUNT)
            return
        if self.filtering and not h.rx_filter.promisc and \
                not h.rx_filter.accept(gather(iov, hdr_len, ETH_ALEN), h.mac):
            self.drop(RxDrop.FILTERED)
            return  # the chains stay held; the next frame overwrites them
        first = iov[0]
        # A header split over descriptors is legal, if odd: then write num_buffers piecewise.
        split = held.first_views() if len(first) < NET_HDR_LEN else None
        used = held.take(n)
        if hdr_len == NET_HDR_LEN:
            if split is None:
                U16.pack_into(first, NUM_BUFFERS_OFFSET, len(used))
            else:
                scatter(split, NUM_BUFFERS_OFFSET, U16.pack(len(used)))
        for head, length in used:
            q.add_used(head, length)
        h.counters["rx_frames"] += 1
        h.counters["rx_bytes"] += n - hdr_len
