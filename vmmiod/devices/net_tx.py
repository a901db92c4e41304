"""virtio-net's transmit path: the guest's chains handed to the backend without a copy.

Each chain's readable views go to os.writev / sendmsg as they are. When the backend is full
(EAGAIN) the chain goes back to the ring and the path waits for the fd to become writable;
the next pop must be that chain again. After a batch the receive path reads the backend at
once, so the host stack's answers to what was just sent (a ping reply, a TCP ACK) cost one
interrupt for both queues instead of a second loop wake-up.
"""

from __future__ import annotations

from vmmiod.devices.net_proto import TxDrop, check_tx_header, gather
from vmmiod.devices.net_rx import IOV_MAX, NetPathHost, NetReceiver, count_drop, ring_unbalanced
from vmmiod.virtqueue import DescriptorChain, SplitQueue

TX_QUEUE = 1
# Frames per wake-up before yielding the loop to the other devices.
TX_BUDGET = 256


class NetTransmitter:
    """The transmit queue's work: send what the guest posted, wait while the backend is full."""

    def __init__(self, host: NetPathHost, rx: NetReceiver) -> None:
        self.host = host
        self.rx = rx
        self.waiting = False  # the backend was full: the fd is watched for writability
        self.undone = -1  # head given back to the ring on EAGAIN: the next pop must be it

    def forget(self) -> None:
        """The ring was reset: the wait and the given-back head belong to the old one."""
        self.unwait()
        self.undone = -1

    def process(self) -> None:
        h = self.host
        q = h.ready_queue(TX_QUEUE)
        if q is None or self.waiting:
            return
        q.disable_notification()
        done = 0
        try:
            while True:
                if done >= TX_BUDGET:
                    h.reschedule(TX_QUEUE)  # yield to the other devices, then go on
                    break
                chain = h.pop_chain(TX_QUEUE)
                if chain is None:
                    if q.enable_notification():
                        q.disable_notification()
                        continue
                    break
                if self.undone >= 0:
                    if chain.head != self.undone:
                        h.inconsistent(q, popped=chain.head, undone=self.undone)
                    self.undone = -1
                if not self.one(q, chain):
                    self.undone = chain.head
                    break
                done += 1
        finally:
            want = bool(done) and h.publish_used(TX_QUEUE)
            if q.ready and ring_unbalanced(q, 0):
                h.inconsistent(q, held=0)
        if done and self.rx.reading:
            # The host stack answers a frame inside our write (a ping reply, a TCP ACK, the
            # data an ACK lets it send): take that now, so one interrupt covers both queues
            # instead of a second one after the next loop wake-up.
            h.counters["rx_after_tx"] += 1
            want = self.rx.poll() or want
        if want:
            h.interrupt(TX_QUEUE)

    def one(self, q: SplitQueue, chain: DescriptorChain) -> bool:
        """Send one chain; False when the backend is full (the chain goes back to the ring)."""
        h = self.host
        hdr_len = h.hdr_len
        views = chain.readable_views()
        hdr: bytes | memoryview = b""
        if chain.readable_len >= hdr_len:
            hdr = views[0] if len(views[0]) >= hdr_len else gather(views, 0, hdr_len)
        reason = check_tx_header(hdr, chain.readable_len, hdr_len, h.driver_features)
        if reason is None and not h.backend.link_up:
            reason = TxDrop.LINK_DOWN
        if reason is None:
            if len(views) > IOV_MAX:
                views = [memoryview(b"".join(views))]  # hostile scatter list: one bounded copy
            try:
                if not h.backend.send(views, hdr_len):
                    reason = TxDrop.NO_PEER
            except BlockingIOError:
                h.unpop_chain(TX_QUEUE, chain)
                self.wait()
                return False
            except OSError as exc:
                reason = TxDrop.BACKEND_ERROR
                if h.counters["tx_dropped_backend_error"] == 0:
                    h.log.warning("net_backend_error", op="transmit", error=str(exc))
        if reason is None:
            h.counters["tx_frames"] += 1
            h.counters["tx_bytes"] += chain.readable_len - hdr_len
        else:
            count_drop(h.log, h.counters, "tx", reason.value)
        q.add_used(chain.head, 0)  # always returned; the device wrote nothing into it
        return True

    def wait(self) -> None:
        h = self.host
        if not self.waiting and h._loop is not None:
            self.waiting = True
            h._loop.add_writer(h.backend.fd, self.writable)

    def unwait(self) -> None:
        if self.waiting:
            self.waiting = False
            h = self.host
            if h._loop is not None and h.backend.fd >= 0:
                h._loop.remove_writer(h.backend.fd)

    def writable(self) -> None:
        self.unwait()
        self.host.reschedule(TX_QUEUE)
