"""The IOREQ server of one guest: create, map, enable, bind, map windows, serve, tear down.

Order (docs/xen.md, "The IOREQ server"): nr_vcpus; create with buffered
ioreqs off (Arm refuses anything else); map resource frame 1 (the synchronous page; frame 0 is
the buffered ring, and get_ioreq_server_info's gfns are EOPNOTSUPP on Arm); enable (vp_eport
values appear in the page only now); bind every vCPU's port, online or not; map each window
(end inclusive). Teardown reverses it; Xen destroys the servers of a dying domain itself, so
teardown errors after the guest is gone are expected and only logged at debug level.

Serving: the event-channel fd is read by the asyncio loop. For each pending port: unmask first
(an event that arrives while we work is then not lost), let its vCPU's
`vmmiod.hypervisors.ioreq_slot.slot_server` (built once when the port is bound) complete the
slot (it owns the barriers and the state order), and notify the port only when a request was
answered.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from typing import Any

from vmmiod.hypervisors import ioreq_slot
from vmmiod.hypervisors.xen.abi import IOREQ_SLOT_SIZE, IOREQ_VP_EPORT_OFFSET, MAX_VCPUS
from vmmiod.hypervisors.xen.handles import DeviceModel, EventChannels, ForeignMemory, page_view

MAX_EVENTS_PER_WAKEUP = 1024  # then yield to the loop; the fd stays readable


class IoreqServerError(OSError):
    pass


class IoreqServer:
    def __init__(self, domid: int, dm: DeviceModel, evtchn: EventChannels, fmem: ForeignMemory,
                 bus: Any, log: Any, counters: dict[str, int]) -> None:
        self.domid = domid
        self.dm = dm
        self.evtchn = evtchn
        self.fmem = fmem
        self.bus = bus
        self.log = log
        self.counters = counters
        self.sid: int | None = None
        self.enabled = False
        self.page: memoryview | None = None
        self.page_addr = 0
        self._resource = 0
        self.nr_vcpus = 0
        self.ports: list[int] = []  # local port per vCPU
        self._port_vcpu: dict[int, int] = {}
        self.ranges: list[tuple[int, int]] = []  # (start, end inclusive)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: dict[int, Callable[[], bool]] = {}  # local port -> its vCPU's slot server

    # -- set-up -----------------------------------------------------------------------------------
    def create(self, ranges: list[tuple[int, int]]) -> None:
        n = self.dm.nr_vcpus()
        if not 0 < n <= MAX_VCPUS:
            raise IoreqServerError(0, f"guest reports {n} vCPUs; one ioreq page serves "
                                      f"1..{MAX_VCPUS}")
        self.nr_vcpus = n
        self.sid = self.dm.create_ioreq_server()
        self.log.info("xen_ioreq_server_created", server=self.sid, vcpus=n)
        self._resource, self.page_addr = self.fmem.map_ioreq_page(self.domid, self.sid)
        self.page = page_view(self.page_addr)
        self.dm.set_ioreq_server_state(self.sid, True)
        self.enabled = True
        self._bind_ports()
        for start, end in ranges:
            self.map_range(start, end)
        self.log.info("xen_ioreq_server_enabled", server=self.sid, ports=list(self.ports),
                      ranges=[f"{s:#x}-{e:#x}" for s, e in self.ranges])

    def attach(self, sid: int, ranges: list[tuple[int, int]]) -> None:
        """Take over the server a previous instance left (docs/restart.md), instead of create().

        The same ioreq page is mapped, the server (still enabled) is enabled again, every
        vCPU's port, left unbound when the old instance's end closed, is bound again, and the
        windows' ranges, which Xen keeps, are claimed again (EEXIST: already ours). Raises
        OSError when Xen refuses (no such server: the domain was rebuilt, or it was destroyed).
        """
        n = self.dm.nr_vcpus()
        if not 0 < n <= MAX_VCPUS:
            raise IoreqServerError(0, f"guest reports {n} vCPUs; one ioreq page serves "
                                      f"1..{MAX_VCPUS}")
        self.nr_vcpus = n
        self._resource, self.page_addr = self.fmem.map_ioreq_page(self.domid, sid)
        self.sid = sid
        self.page = page_view(self.page_addr)
        self.dm.set_ioreq_server_state(sid, True)
        self.enabled = True
        self._bind_ports()
        for start, end in ranges:
            try:
                self.map_range(start, end)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                self.ranges.append((start, end))
        self.log.info("xen_ioreq_server_reattached", server=sid, ports=list(self.ports),
                      ranges=[f"{s:#x}-{e:#x}" for s, e in self.ranges])

    def _bind_ports(self) -> None:
        assert self.page is not None
        for vcpu in range(self.nr_vcpus):
            at = vcpu * IOREQ_SLOT_SIZE + IOREQ_VP_EPORT_OFFSET
            eport = int.from_bytes(self.page[at:at + 4], "little")
            port = self.evtchn.bind_interdomain(self.domid, eport)
            self.ports.append(port)
            self._port_vcpu[port] = vcpu
            self._servers[port] = ioreq_slot.slot_server(self.page, vcpu, self.bus)

    def serve_pending(self) -> int:
        """Answer every slot a dead predecessor left READY or INPROCESS (its vCPU waits on it;
        the event that announced it went to the old instance). Returns how many."""
        page = self.page
        answered = 0
        for vcpu, port in enumerate(self.ports):
            if page is not None and ioreq_slot.serve_ioreq_slot(page, vcpu, self.bus,
                                                                resume=True):
                answered += 1
                self.counters["ioreqs"] = self.counters.get("ioreqs", 0) + 1
                try:
                    self.evtchn.notify(port)
                except OSError as exc:
                    self.log.warning("xen_evtchn_failed", port=port, error=str(exc))
        return answered

    def map_range(self, start: int, end_inclusive: int) -> None:
        assert self.sid is not None
        self.dm.map_mmio_range(self.sid, start, end_inclusive)
        self.ranges.append((start, end_inclusive))

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.evtchn.fd, self.on_event)

    # -- serving ----------------------------------------------------------------------------------
    def on_event(self) -> None:
        page = self.page
        if page is None:
            return
        evtchn = self.evtchn
        self.counters["wakeups"] = self.counters.get("wakeups", 0) + 1
        for _ in range(MAX_EVENTS_PER_WAKEUP):
            try:
                port = evtchn.pending()
            except OSError as exc:
                self.log.error("xen_evtchn_failed", error=str(exc))
                return
            if port is None:
                return
            self.counters["events"] = self.counters.get("events", 0) + 1
            try:
                evtchn.unmask(port)
            except OSError as exc:
                self.log.warning("xen_evtchn_failed", port=port, error=str(exc))
            serve = self._servers.get(port)
            if serve is None:
                continue
            try:
                answered = serve()
            except Exception as exc:  # a bug below the bus: log it, keep serving the others
                self.log.exception("xen_ioreq_failed", vcpu=self._port_vcpu[port],
                                   error=repr(exc))
                continue
            if answered:
                self.counters["ioreqs"] = self.counters.get("ioreqs", 0) + 1
                try:
                    evtchn.notify(port)
                except OSError as exc:
                    self.log.warning("xen_evtchn_failed", port=port, error=str(exc))

    # -- teardown ---------------------------------------------------------------------------------
    def quiesce(self) -> None:
        """Serve no more requests (they wait in their slots for the next instance)."""
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.evtchn.fd)
            except (ValueError, OSError):
                pass
            self._loop = None

    def leave(self) -> None:
        """Stop for a restart: the server stays enabled with its ranges for the next instance
        to attach(); only this process's ports and mapping go. Never raises."""
        self.quiesce()
        self.sid = None
        self.enabled = False
        self.ranges.clear()
        self.destroy()

    def destroy(self) -> None:
        """Undo whatever create() did, in reverse; never raises."""
        self.quiesce()
        # The reference order: disable, destroy (which drops its ranges), unbind, unmap.
        if self.sid is not None and self.enabled:
            self._quiet(self.dm.set_ioreq_server_state, self.sid, False)
            self.enabled = False
        if self.sid is not None:
            self._quiet(self.dm.destroy_ioreq_server, self.sid)
            self.log.info("xen_ioreq_server_destroyed", server=self.sid)
            self.sid = None
        self.ranges.clear()
        for port in self.ports:
            self._quiet(self.evtchn.unbind, port)
        self.ports.clear()
        self._port_vcpu.clear()
        self._servers.clear()
        if self.page is not None:
            self.page.release()
            self.page = None
        if self._resource:
            self._quiet(self.fmem.unmap_resource, self._resource)
            self._resource = 0

    def _quiet(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except OSError as exc:
            self.log.debug("xen_teardown_step_failed", step=getattr(fn, "__name__", "?"),
                           error=str(exc))
