"""virtio-net (VIRTIO 1.2, section 5.1): a guest's network card on a TAP or a datagram socket.

Queues: 0 receiveq, 1 transmitq, 2 controlq (with CTRL_VQ). Frames move between guest memory
and the backend without a copy through Python bytes: receive reads (os.readv / recvmsg_into)
straight into the writable views of the posted chains, header in place; transmit hands the
chain's readable views to os.writev / sendmsg.

Receive runs only while the guest has buffers posted: the backend fd is watched (add_reader)
while the device holds or can pop receive chains, and unwatched otherwise, so a flood waits in
the kernel's bounded TAP/socket queue, never in the daemon. With MRG_RXBUF the device holds
enough chains for the largest frame the guest may get, fills them in order and writes
num_buffers; without it every frame must fit one chain. A frame that does not fit what the
guest posted is dropped and counted.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from vmmiod.config import GuestConfig, NetConfig, TapBackend
from vmmiod.devices.base import VIRTIO_F_VERSION_1, BackendError, VirtioDevice, queue_fault_reason
from vmmiod.devices.net_ctrl import CtrlResult, RxFilter, serve_controlq
from vmmiod.devices.net_dgram import RECV_FOREIGN, DgramSocket
from vmmiod.devices.net_proto import (
    CONFIG,
    CONFIG_MAC_OFFSET,
    ETH_ALEN,
    ETH_HLEN,
    GUEST_GSO_MASK,
    GUEST_OFFLOAD_MASK,
    MAX_FRAME_WITH_HDR,
    NET_FEATURES,
    NET_HDR_LEN,
    NET_HDR_LEN_LEGACY,
    NUM_BUFFERS_OFFSET,
    OFFLOAD_FEATURES,
    U16,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    VLAN_HLEN,
    NetBackendIO,
    RxDrop,
    TxDrop,
    check_tx_header,
    default_mac,
    features_consistent,
    format_mac,
    gather,
    parse_mac,
    scatter,
)
from vmmiod.devices.net_rx import (
    IOV_MAX,
    RxHeld,
    count_drop,
    report_inconsistency,
    ring_unbalanced,
)
from vmmiod.devices.net_tap import TapInterface
from vmmiod.memory import GuestMemoryError
from vmmiod.virtqueue import DescriptorChain, SplitQueue, VirtqueueError

RX_QUEUE, TX_QUEUE, CTRL_QUEUE = 0, 1, 2
CTRL_QUEUE_SIZE = 64
# Frames per wake-up of each direction before yielding the loop to the other devices.
RX_BUDGET = 128
TX_BUDGET = 256


class NetDevice(VirtioDevice):
    device_id = 1
    type_name = "net"

    def __init__(self, cfg: NetConfig, guest: GuestConfig, *, access_platform: bool = False,
                 log: Any = None) -> None:
        log = log if log is not None else structlog.get_logger().bind(
            guest=guest.name, device=cfg.id)
        super().__init__(cfg.id, (cfg.queue_size, cfg.queue_size, CTRL_QUEUE_SIZE),
                         access_platform=access_platform, log=log)
        self.cfg = cfg
        self.mac = parse_mac(cfg.mac) if cfg.mac else default_mac(guest.name, cfg.id)
        self.backend: NetBackendIO
        if isinstance(cfg.backend, TapBackend):
            self.backend = TapInterface(cfg.backend, guest.name, cfg.id, cfg.mtu, self.log,
                                        on_fd=self._backend_fd_changed)
        else:
            self.backend = DgramSocket(cfg.backend, self.log)
        self.rx_filter = RxFilter()
        self.hdr_len = NET_HDR_LEN
        self.mrg_rxbuf = False
        self.guest_offloads = 0
        self._rx_need = 0
        self._rx_held = RxHeld()
        self._reading = False
        self._filtering = False
        self._tx_waiting = False
        self._tx_undone = -1  # head given back to the ring on EAGAIN: the next pop must be it
        self._opened = False
        for key in ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "ctrl_commands",
                    "ctrl_errors", "config_interrupts", "link_changes", "inconsistencies",
                    "rx_wakeups", "rx_after_tx"):
            self.counters[key] = 0
        for reason in RxDrop:
            self.counters[f"rx_dropped_{reason.value}"] = 0
        for tx in TxDrop:
            self.counters[f"tx_dropped_{tx.value}"] = 0

    # -- features and config space --------------------------------------------------------------
    def device_features(self) -> int:
        f = super().device_features() | NET_FEATURES
        if self.backend.offloads:
            f |= OFFLOAD_FEATURES
        return f

    def validate_features(self, features: int) -> bool:
        return features_consistent(features)

    @property
    def link_up(self) -> bool:
        return self._opened and self.backend.link_up

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return CONFIG.pack(self.mac, status, 1, self.cfg.mtu)

    def write_config(self, offset: int, size: int, value: int) -> None:
        # Only a legacy driver (no VERSION_1) may set the MAC through config space (5.1.4.2).
        if self.has_feature(VIRTIO_F_VERSION_1) or offset < CONFIG_MAC_OFFSET \
                or offset + size > ETH_ALEN:
            return
        mac = bytearray(self.mac)
        mac[offset:offset + size] = value.to_bytes(size, "little")
        self.mac = bytes(mac)
        self.state_changed()

    # -- backend lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        try:
            self.backend.open(asyncio.get_running_loop(), self._link_changed)
        except BackendError as exc:
            raise BackendError(f"net device {self.name}: {exc}") from None
        self._opened = True
        self.log.info("net_device_opened", mac=format_mac(self.mac), mtu=self.cfg.mtu,
                      **self.backend.describe())

    async def close(self) -> None:
        self._rx_stop()
        self._tx_unwait()
        self.backend.close()
        self._opened = False
        self.log.info("net_device_closed", **self.stats())

    def _link_changed(self, up: bool) -> None:
        self.counters["link_changes"] += 1
        if self.active and not self.failed and self.transport is not None \
                and self.has_feature(VIRTIO_NET_F_STATUS):
            self.counters["config_interrupts"] += 1
            self.transport.signal_config_change()

    def _backend_fd_changed(self, attached: bool) -> None:
        """The TAP was deleted (its fd about to close) or a new one attached (link follows)."""
        if not attached:
            self._rx_stop()
            if self._tx_waiting:
                self._tx_unwait()
                self._reschedule(TX_QUEUE)  # the chain given back is dropped: link down
        else:
            self._guarded(self._rx_start, RX_QUEUE)

    # -- activation -----------------------------------------------------------------------------
    def on_activate(self) -> None:
        mrg = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        self.mrg_rxbuf = mrg
        self.hdr_len = NET_HDR_LEN if mrg or self.has_feature(VIRTIO_F_VERSION_1) \
            else NET_HDR_LEN_LEGACY
        self.rx_filter.reset()
        self._filtering = self.has_feature(VIRTIO_NET_F_CTRL_RX)
        self._rx_held.clear()
        self._apply_offloads(self.driver_features & GUEST_OFFLOAD_MASK)
        self.log.info("net_device_activated", features=hex(self.driver_features),
                      mrg_rxbuf=mrg, hdr_len=self.hdr_len, link_up=self.link_up)
        self._guarded(self._rx_start, RX_QUEUE)  # inside the window's register write: no raise

    def _apply_offloads(self, offloads: int) -> None:
        self.guest_offloads = offloads
        gso = offloads & GUEST_GSO_MASK
        # The largest frame the backend may hand the guest, header included.
        self._rx_need = MAX_FRAME_WITH_HDR if gso else \
            self.hdr_len + ETH_HLEN + VLAN_HLEN + self.cfg.mtu
        if self._opened:
            try:
                self.backend.configure(self.hdr_len, (self.driver_features & ~GUEST_OFFLOAD_MASK)
                                       | offloads)
            except OSError as exc:
                self.log.error("net_backend_error", op="configure", error=str(exc))

    def on_reset(self) -> None:
        self._rx_stop()
        self._tx_unwait()
        self._tx_undone = -1
        self._rx_held.clear()
        if self._opened and self.guest_offloads:
            # The next driver may take fewer offloads: stop the kernel queueing offloaded frames.
            self.guest_offloads = 0
            try:
                self.backend.configure(self.hdr_len, 0)
            except OSError as exc:
                self.log.error("net_backend_error", op="configure", error=str(exc))

    def on_queue_reset(self, index: int) -> None:
        """The driver disabled or reset one queue: forget every chain popped from it.

        Chains held from before the reset must never reach the new ring's used ring (the
        driver has recycled those heads), and a transmit wait belongs to the old ring.
        """
        super().on_queue_reset(index)
        if index == RX_QUEUE:
            self._rx_stop()
            self._rx_held.clear()
        elif index == TX_QUEUE:
            self._tx_unwait()
            self._tx_undone = -1

    def process_queue(self, index: int) -> None:
        if index == RX_QUEUE:
            self._rx_start()
        elif index == TX_QUEUE:
            self._tx_process()
        elif index == CTRL_QUEUE and self.has_feature(VIRTIO_NET_F_CTRL_VQ):
            self._ctrl_process()

    def _queue(self, index: int) -> SplitQueue | None:
        if index < len(self.queues) and self.queues[index].ready:
            return self.queues[index]
        return None

    def _guarded(self, fn: Any, index: int) -> None:
        """Run backend-driven queue work (fd callbacks) with the base class's fault handling."""
        if not self.active or self.failed:
            return
        try:
            fn()
        except (VirtqueueError, GuestMemoryError) as exc:
            self.fault(queue_fault_reason(index, exc), queue=index, error=type(exc).__name__)

    def _reschedule(self, index: int) -> None:
        if self._loop is not None and index not in self._pending:
            self._pending.add(index)
            self._loop.call_soon(self._run_queue, index)

    # -- receive --------------------------------------------------------------------------------
    def _rx_start(self) -> None:
        q = self._queue(RX_QUEUE)
        if self._reading or q is None or not self._opened or self._loop is None \
                or self.backend.fd < 0:
            return
        if not self._rx_can_read(q) and not q.has_available() and not q.enable_notification():
            return  # wait for the guest's next receive-queue notification
        q.disable_notification()
        self._loop.add_reader(self.backend.fd, self._guarded, self._rx_ready, RX_QUEUE)
        self._reading = True

    def _rx_stop(self) -> None:
        if self._reading:
            self._reading = False
            if self._loop is not None and self.backend.fd >= 0:
                self._loop.remove_reader(self.backend.fd)

    def _rx_can_read(self, q: SplitQueue) -> bool:  # room for the largest frame, or all
        return self._rx_held.can_read(self.mrg_rxbuf, self._rx_need, q.size)

    def _rx_fill(self, q: SplitQueue) -> bool:
        """Hold enough posted chains for the next frame; False: wait for the guest to post."""
        held = self._rx_held
        held.refresh(q.memory.generation if q.memory is not None else 0)
        want = self._rx_need if self.mrg_rxbuf else 1
        chains = held.chains
        while (held.cap < want if self.mrg_rxbuf else not chains) and len(chains) < q.size \
                and not held.full():
            chain = q.pop()
            if chain is None:
                break
            # Each buffer must at least hold the header (5.1.6.3.1), and carry nothing to read.
            if chain.readable or chain.writable_len < self.hdr_len:
                self._rx_drop(RxDrop.BAD_BUFFER)
                q.add_used(chain.head, 0)
                continue
            held.add(chain)
        return self._rx_can_read(q)

    def _rx_drop(self, reason: RxDrop) -> None:
        count_drop(self.log, self.counters, "rx", reason.value)

    def _rx_ready(self) -> None:
        self.counters["rx_wakeups"] += 1  # the backend fd became readable: one loop wake-up
        if self._rx_drain():
            self.interrupt(RX_QUEUE)

    def _rx_drain(self) -> bool:
        """Receive what the backend has queued; True when the driver wants an interrupt."""
        q = self._queue(RX_QUEUE)
        if q is None:
            self._rx_stop()
            return False
        start = q.next_used
        want = False
        try:
            for _ in range(RX_BUDGET):
                if not self._rx_fill(q):
                    self._rx_stop()
                    if q.enable_notification():  # buffers arrived while we looked
                        self._reschedule(RX_QUEUE)
                    break
                self._rx_one(q)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._rx_stop()
            self.log.warning("net_backend_error", op="receive", error=str(exc))
        finally:
            if q.next_used != start:
                want = self.publish_used(RX_QUEUE)
            if ring_unbalanced(q, len(self._rx_held)):
                self._inconsistent(q, held=len(self._rx_held))
        return want

    def _rx_one(self, q: SplitQueue) -> None:
        """Receive one frame into the held chains (BlockingIOError when none is queued)."""
        held = self._rx_held
        hdr_len = self.hdr_len
        iov, cap = held.iov, held.cap
        n = self.backend.recv(iov, cap, hdr_len)  # may append to iov for the call; restores it
        if n == RECV_FOREIGN:
            self._rx_drop(RxDrop.FOREIGN_SENDER)
            return
        if n > cap:
            self._rx_drop(RxDrop.TOO_BIG)
            return
        if n < hdr_len + ETH_HLEN:
            self._rx_drop(RxDrop.RUNT)
            return
        if self._filtering and not self.rx_filter.promisc and \
                not self.rx_filter.accept(gather(iov, hdr_len, ETH_ALEN), self.mac):
            self._rx_drop(RxDrop.FILTERED)
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
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += n - hdr_len

    # -- transmit -------------------------------------------------------------------------------
    def _tx_process(self) -> None:
        q = self._queue(TX_QUEUE)
        if q is None or self._tx_waiting:
            return
        q.disable_notification()
        done = 0
        try:
            while True:
                if done >= TX_BUDGET:
                    self._reschedule(TX_QUEUE)  # yield to the other devices, then go on
                    break
                chain = self.pop_chain(TX_QUEUE)
                if chain is None:
                    if q.enable_notification():
                        q.disable_notification()
                        continue
                    break
                if self._tx_undone >= 0:
                    if chain.head != self._tx_undone:
                        self._inconsistent(q, popped=chain.head, undone=self._tx_undone)
                    self._tx_undone = -1
                if not self._tx_one(q, chain):
                    self._tx_undone = chain.head
                    break
                done += 1
        finally:
            want = bool(done) and self.publish_used(TX_QUEUE)
            if q.ready and ring_unbalanced(q, 0):
                self._inconsistent(q, held=0)
        if done and self._reading:
            # The host stack answers a frame inside our write (a ping reply, a TCP ACK, the
            # data an ACK lets it send): take that now, so one interrupt covers both queues
            # instead of a second one after the next loop wake-up.
            self.counters["rx_after_tx"] += 1
            want = self._rx_poll() or want
        if want:
            self.interrupt(TX_QUEUE)

    def _rx_poll(self) -> bool:
        try:
            return self._rx_drain()
        except (VirtqueueError, GuestMemoryError) as exc:
            self.fault(queue_fault_reason(RX_QUEUE, exc), queue=RX_QUEUE, error=type(exc).__name__)
            return False

    def _tx_one(self, q: SplitQueue, chain: DescriptorChain) -> bool:
        """Send one chain; False when the backend is full (the chain goes back to the ring)."""
        hdr_len = self.hdr_len
        views = chain.readable_views()
        hdr: bytes | memoryview = b""
        if chain.readable_len >= hdr_len:
            hdr = views[0] if len(views[0]) >= hdr_len else gather(views, 0, hdr_len)
        reason = check_tx_header(hdr, chain.readable_len, hdr_len, self.driver_features)
        if reason is None and not self.backend.link_up:
            reason = TxDrop.LINK_DOWN
        if reason is None:
            if len(views) > IOV_MAX:
                views = [memoryview(b"".join(views))]  # hostile scatter list: one bounded copy
            try:
                if not self.backend.send(views, hdr_len):
                    reason = TxDrop.NO_PEER
            except BlockingIOError:
                self.unpop_chain(TX_QUEUE, chain)
                self._tx_wait()
                return False
            except OSError as exc:
                reason = TxDrop.BACKEND_ERROR
                if self.counters["tx_dropped_backend_error"] == 0:
                    self.log.warning("net_backend_error", op="transmit", error=str(exc))
        if reason is None:
            self.counters["tx_frames"] += 1
            self.counters["tx_bytes"] += chain.readable_len - hdr_len
        else:
            count_drop(self.log, self.counters, "tx", reason.value)
        q.add_used(chain.head, 0)  # always returned; the device wrote nothing into it
        return True

    def _inconsistent(self, q: SplitQueue, **context: int) -> None:
        if not self.failed:  # after a fault mid-chain the books are off by design (logged)
            report_inconsistency(self.log, self.counters, q, **context)

    def _tx_wait(self) -> None:
        if not self._tx_waiting and self._loop is not None:
            self._tx_waiting = True
            self._loop.add_writer(self.backend.fd, self._tx_writable)

    def _tx_unwait(self) -> None:
        if self._tx_waiting:
            self._tx_waiting = False
            if self._loop is not None and self.backend.fd >= 0:
                self._loop.remove_writer(self.backend.fd)

    def _tx_writable(self) -> None:
        self._tx_unwait()
        self._reschedule(TX_QUEUE)

    # -- control --------------------------------------------------------------------------------
    def _ctrl_process(self) -> None:
        q = self._queue(CTRL_QUEUE)
        if q is None:
            return
        done = serve_controlq(q, CTRL_QUEUE_SIZE, self.rx_filter, self.driver_features,
                              self.counters, self._ctrl_applied, self.log,
                              lambda: self.pop_chain(CTRL_QUEUE))
        if done:
            self.state_changed()  # filters, MAC, offloads recorded before the driver's ack
            self.notify_used(CTRL_QUEUE)
        if done == CTRL_QUEUE_SIZE:
            self._reschedule(CTRL_QUEUE)

    # -- restart (docs/restart.md) --------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        return {"mac": self.mac.hex(), "offloads": self.guest_offloads,
                "filter": self.rx_filter.export()}

    def import_state(self, state: dict[str, Any]) -> None:
        mac, offloads, rx_filter = state.get("mac"), state.get("offloads"), state.get("filter")
        if isinstance(mac, str) and len(mac) == 2 * ETH_ALEN:
            try:
                self.mac = bytes.fromhex(mac)
            except ValueError:
                pass
        if isinstance(rx_filter, dict):
            self.rx_filter.restore(rx_filter)
        if isinstance(offloads, int) and not offloads & ~(self.driver_features
                                                          & GUEST_OFFLOAD_MASK):
            self._apply_offloads(offloads)

    def resume(self, chains: dict[int, list[DescriptorChain]]) -> None:
        """Receive buffers the dead daemon held are held again; transmit chains in flight are
        sent again (a frame may reach the peer twice, none is lost); control commands redone."""
        for chain in chains.pop(RX_QUEUE, []):
            self._rx_held.add(chain)
        super().resume(chains)

    def _ctrl_applied(self, result: CtrlResult) -> None:
        if result.new_mac is not None:
            self.mac = result.new_mac
        if result.new_offloads is not None:
            self._apply_offloads(result.new_offloads)
