"""virtio-net (VIRTIO 1.2, section 5.1): a guest's network card on a TAP or a datagram socket.

Queues: 0 receiveq, 1 transmitq, 2 controlq (with CTRL_VQ). Frames move between guest memory
and the backend without a copy through Python bytes. This module is the device: its features,
config space, backend and link, activation and reset, restart state. The queues' work lives
beside it: receive in net_rx.py (NetReceiver), transmit in net_tx.py (NetTransmitter), the
control queue in net_ctrl.py. With MRG_RXBUF the device holds enough chains for the largest
frame the guest may get, fills them in order and writes num_buffers; without it every frame
must fit one chain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from vmmiod.config import GuestConfig, NetConfig, TapBackend
from vmmiod.devices.base import BackendError, VirtioDevice, queue_fault_reason
from vmmiod.devices.net_ctrl import CtrlResult, RxFilter, serve_controlq
from vmmiod.devices.net_dgram import DgramSocket
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
    OFFLOAD_FEATURES,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    VLAN_HLEN,
    NetBackendIO,
    RxDrop,
    TxDrop,
    default_mac,
    features_consistent,
    format_mac,
    parse_mac,
)
from vmmiod.devices.net_rx import RX_BUDGET, RX_QUEUE, NetReceiver, report_inconsistency
from vmmiod.devices.net_tap import TapInterface
from vmmiod.devices.net_tx import TX_BUDGET, TX_QUEUE, NetTransmitter
from vmmiod.memory import GuestMemoryError
from vmmiod.transport import VIRTIO_F_VERSION_1
from vmmiod.virtqueue import DescriptorChain, SplitQueue, VirtqueueError

CTRL_QUEUE = 2
CTRL_QUEUE_SIZE = 64
__all__ = ["CTRL_QUEUE", "CTRL_QUEUE_SIZE", "RX_BUDGET", "RX_QUEUE", "TX_BUDGET", "TX_QUEUE",
           "NetDevice"]


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
        self._opened = False
        self.rx = NetReceiver(self)
        self.tx = NetTransmitter(self, self.rx)
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
    def opened(self) -> bool:
        return self._opened

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
        self.rx.stop()
        self.tx.unwait()
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
            self.rx.stop()
            if self.tx.waiting:
                self.tx.unwait()
                self.reschedule(TX_QUEUE)  # the chain given back is dropped: link down
        else:
            self.guarded(self.rx.start, RX_QUEUE)

    # -- activation -----------------------------------------------------------------------------
    def on_activate(self) -> None:
        mrg = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        self.mrg_rxbuf = mrg
        self.hdr_len = NET_HDR_LEN if mrg or self.has_feature(VIRTIO_F_VERSION_1) \
            else NET_HDR_LEN_LEGACY
        self.rx_filter.reset()
        self.rx.filtering = self.has_feature(VIRTIO_NET_F_CTRL_RX)
        self.rx.held.clear()
        self._apply_offloads(self.driver_features & GUEST_OFFLOAD_MASK)
        self.log.info("net_device_activated", features=hex(self.driver_features),
                      mrg_rxbuf=mrg, hdr_len=self.hdr_len, link_up=self.link_up)
        self.guarded(self.rx.start, RX_QUEUE)  # inside the window's register write: no raise

    def _apply_offloads(self, offloads: int) -> None:
        self.guest_offloads = offloads
        gso = offloads & GUEST_GSO_MASK
        # The largest frame the backend may hand the guest, header included.
        self.rx.need = MAX_FRAME_WITH_HDR if gso else \
            self.hdr_len + ETH_HLEN + VLAN_HLEN + self.cfg.mtu
        if self._opened:
            try:
                self.backend.configure(self.hdr_len, (self.driver_features & ~GUEST_OFFLOAD_MASK)
                                       | offloads)
            except OSError as exc:
                self.log.error("net_backend_error", op="configure", error=str(exc))

    def on_reset(self) -> None:
        self.rx.stop()
        self.tx.forget()
        self.rx.held.clear()
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
            self.rx.stop()
            self.rx.held.clear()
        elif index == TX_QUEUE:
            self.tx.forget()

    def process_queue(self, index: int) -> None:
        if index == RX_QUEUE:
            self.rx.start()
        elif index == TX_QUEUE:
            self.tx.process()
        elif index == CTRL_QUEUE and self.has_feature(VIRTIO_NET_F_CTRL_VQ):
            self._ctrl_process()

    def ready_queue(self, index: int) -> SplitQueue | None:
        if index < len(self.queues) and self.queues[index].ready:
            return self.queues[index]
        return None

    def guarded(self, fn: Callable[[], None], index: int) -> None:
        """Run backend-driven queue work (fd callbacks) with the base class's fault handling."""
        if not self.active or self.failed:
            return
        try:
            fn()
        except (VirtqueueError, GuestMemoryError) as exc:
            self.fault(queue_fault_reason(index, exc), queue=index, error=type(exc).__name__)

    def reschedule(self, index: int) -> None:
        if self._loop is not None and index not in self._pending:
            self._pending.add(index)
            self._loop.call_soon(self._run_queue, index)

    def inconsistent(self, q: SplitQueue, **context: int) -> None:
        if not self.failed:  # after a fault mid-chain the books are off by design (logged)
            report_inconsistency(self.log, self.counters, q, **context)

    # -- control --------------------------------------------------------------------------------
    def _ctrl_process(self) -> None:
        q = self.ready_queue(CTRL_QUEUE)
        if q is None:
            return
        done = serve_controlq(q, CTRL_QUEUE_SIZE, self.rx_filter, self.driver_features,
                              self.counters, self._ctrl_applied, self.log,
                              lambda: self.pop_chain(CTRL_QUEUE))
        if done:
            self.state_changed()  # filters, MAC, offloads recorded before the driver's ack
            self.notify_used(CTRL_QUEUE)
        if done == CTRL_QUEUE_SIZE:
            self.reschedule(CTRL_QUEUE)

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
            self.rx.held.add(chain)
        super().resume(chains)

    def _ctrl_applied(self, result: CtrlResult) -> None:
        if result.new_mac is not None:
            self.mac = result.new_mac
        if result.new_offloads is not None:
            self._apply_offloads(result.new_offloads)
