"""XenAdaptor: vmmiod as the IOREQ server of one Xen guest (see docs/xen.md).

prepare(): libraries, /dev/xen nodes, xenstore, the guest's domid (waited for), handles, the
dm_op probe (ENOSYS = hypervisor without IOREQ support), barriers, the toolstack's backend
entries paired with the config, the IOREQ server created and enabled for every window, then
InitWait for the toolstack (xl waits 10 s for it, then unpauses a rebooted guest).
start(): guest memory on the bus, serving the event channels, the optional eventfd fast path
(fastpath.py), xentoolcore_restrict_all(domid). stop(): Closed, teardown.
"""

from __future__ import annotations

import asyncio
import errno
import os
import platform
import time
from typing import Any

from vmmiod.config import MMIO_WINDOW_SIZE, Config, XenConfig
from vmmiod.fences import is_arm64
from vmmiod.hypervisors.base import Adaptor, PlatformUnavailable
from vmmiod.hypervisors.xen import backends, domain, record
from vmmiod.hypervisors.xen.fastpath import open_fast_path
from vmmiod.hypervisors.xen.guestmem import XenGuestMemory, XenMapper
from vmmiod.hypervisors.xen.handles import DeviceModel, EventChannels, ForeignMemory, GrantTable
from vmmiod.hypervisors.xen.irq import IrqRangeError, Privcmd, XenInterruptLine, check_irq
from vmmiod.hypervisors.xen.libs import Loader, XenLibs, load_libraries
from vmmiod.hypervisors.xen.platform import NO_IOREQ_SERVER, check_nodes, probe_dm_op
from vmmiod.hypervisors.xen.server import IoreqServer
from vmmiod.hypervisors.xen.xenstore import XenStore, XenStoreError


class BackendMismatch(PlatformUnavailable):
    """The toolstack's devices and the YAML config disagree (a configuration problem)."""

    exit_code = 78


class XenAdaptor(Adaptor):
    kind = "xen"

    def __init__(self, config: Config, bus: Any, log: Any, *, loader: Loader | None = None,
                 dev_dir: str = "/dev/xen", machine: str | None = None,
                 run_dir: str | None = None) -> None:
        super().__init__(bus, log)
        if not isinstance(config.hypervisor, XenConfig):
            raise TypeError("XenAdaptor needs a XenConfig")
        self.config = config
        self.xen: XenConfig = config.hypervisor
        self._loader = loader
        self.dev_dir = dev_dir
        self.machine = (machine or platform.machine()).lower()
        self.libs: XenLibs | None = None
        self.domid = -1
        self.xs: XenStore | None = None
        self.dm: DeviceModel | None = None
        self.evtchn: EventChannels | None = None
        self.fmem: ForeignMemory | None = None
        self.memory: XenGuestMemory | None = None
        self.mapper: XenMapper | None = None
        self.server: IoreqServer | None = None
        self.privcmd: Privcmd | None = None
        self.backends: backends.Backends | None = None
        self._irq_method = self._choose_irq_method()
        self._lines: dict[int, XenInterruptLine] = {}
        self._grants = self.xen.grants is True
        self.restricted = False
        self._nr_vcpus = 0
        self.counters = {"wakeups": 0, "events": 0, "ioreqs": 0, "interrupts": 0,
                         "interrupt_errors": 0}
        self._record = record.record_path(config.guest.name, run_dir)

    # -- prepare ----------------------------------------------------------------------------------
    async def prepare(self) -> None:
        loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
        self.libs = load_libraries(self._loader) if self._loader else load_libraries()
        check_nodes(self.dev_dir, ["privcmd", "evtchn"])
        try:
            self.xs = XenStore(self.libs)
        except XenStoreError as exc:
            raise PlatformUnavailable(
                f"cannot connect to xenstored ({os.strerror(exc.errno or errno.ENOENT)}): start "
                "the Xen services in dom0 (systemctl start xenstored.service, or xencommons)"
            ) from None
        self.domid = await domain.resolve_domid(self.xs, self.config.guest,
                                                self.xen.domain_wait, self.log)
        self.log = self.log.bind(domid=self.domid)
        try:
            await self._prepare_domain(loop)
        except PlatformUnavailable as exc:  # a dm_op on a domain that died meanwhile fails too
            domain.check_still_there(self.xs, self.domid, self.config.guest.name, self.log,
                                     cause=str(exc))
            raise

    async def _prepare_domain(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.xs is not None
        self._open_handles()
        assert self.dm is not None
        self._nr_vcpus = probe_dm_op(self.dm, self.domid)
        self.backends = backends.Backends(self.xs, self.xen.backend_domid, self.domid,
                                          self.config.devices, self.log)
        await self._discover()
        if self._grants:
            check_nodes(self.dev_dir, ["gntdev"])
        self._check_irqs()
        if self.server is None:
            self._create_server()
        else:  # created early (_serve_early): the windows whose entries came last
            for _d, base, _i in self._all_windows():
                if (base, base + MMIO_WINDOW_SIZE - 1) not in self.server.ranges:
                    self.server.map_range(base, base + MMIO_WINDOW_SIZE - 1)
            self.backends.sync_known()
        self.backends.watch(loop, self._on_domain_release)
        self.log.info("xen_prepared", vcpus=self._nr_vcpus, grants=self._grants,
                      interrupts=self._irq_method, windows=[
                          {"device": d, "base": hex(b), "irq": i} for d, b, i in self.windows()])

    def _open_handles(self) -> None:
        assert self.libs is not None
        try:
            self.dm = DeviceModel(self.libs, self.domid)
            self.evtchn = EventChannels(self.libs)
            self.fmem = ForeignMemory(self.libs)
        except OSError as exc:
            raise PlatformUnavailable(
                f"cannot open the Xen interfaces ({exc}): run vmmiod as root in dom0 with "
                "/dev/xen/privcmd and /dev/xen/evtchn available") from None

    async def _discover(self) -> None:
        assert self.backends is not None and self.xs is not None
        deadline = time.monotonic() + max(self.xen.domain_wait, 0.0)
        announced = False
        while True:
            try:
                done = self.backends.discover(self.xen.require_entries)
            except backends.MismatchError as exc:
                raise BackendMismatch(str(exc)) from None
            if done:
                break
            domain.check_still_there(self.xs, self.domid, self.config.guest.name, self.log,
                                     missing=self.backends.missing_ids())
            if self.xen.require_entries:
                self._serve_early()
            if time.monotonic() >= deadline:
                raise BackendMismatch(self.backends.missing_message())
            if not announced:
                self.log.info("xen_backends_waiting", missing=self.backends.missing_ids())
                announced = True
            await asyncio.sleep(domain.POLL_INTERVAL)
        if self.xen.grants == "auto":
            usage = self.backends.grant_usage()
            if usage is None:
                raise BackendMismatch(
                    "the toolstack's virtio entries disagree on grant_usage; set hypervisor."
                    "grants explicitly or declare every device alike")
            self._grants = usage

    def _serve_early(self) -> None:
        """The dom0 service's instance: libxl writes the entries one by one and gives each its
        own 10 s for InitWait from that moment, so each window is served (claimed by an enabled
        IOREQ server) and answered InitWait as soon as its entry is there and surely ours."""
        assert self.backends is not None
        try:
            early = self.backends.early_entries()
        except backends.MismatchError as exc:
            raise BackendMismatch(str(exc)) from None
        if not early:
            return
        for e in early:
            try:
                check_irq(self._irq_method, e.irq)
            except IrqRangeError as exc:
                raise BackendMismatch(f"{e.path}: {exc} (hypervisor.interrupts: "
                                      f"{self.xen.interrupts})") from None
        if self.server is None:  # create() maps these ranges before InitWait is written
            self._create_server(sorted({(e.base, e.base + MMIO_WINDOW_SIZE - 1) for e in early}))
        assert self.server is not None
        for e in early:
            if (e.base, e.base + MMIO_WINDOW_SIZE - 1) not in self.server.ranges:
                self.server.map_range(e.base, e.base + MMIO_WINDOW_SIZE - 1)
        self.backends.sync_known()

    def _check_irqs(self) -> None:
        for dev_id, _base, irq in self._all_windows():
            try:
                check_irq(self._irq_method, irq)
            except IrqRangeError as exc:
                raise BackendMismatch(f"device {dev_id!r}: {exc} (hypervisor.interrupts: "
                                      f"{self.xen.interrupts})") from None

    def _choose_irq_method(self) -> str:
        if self.xen.interrupts != "auto":
            return self.xen.interrupts
        return "spi" if is_arm64(self.machine) else "isa"

    # -- what the daemon asks ---------------------------------------------------------------------
    @property
    def access_platform(self) -> bool:
        return self._grants

    def windows(self) -> list[tuple[str, int, int]]:
        return self.backends.auto_windows() if self.backends is not None else []

    def _all_windows(self) -> list[tuple[str, int, int]]:
        auto = {d: (b, i) for d, b, i in self.windows()}
        out = []
        for dcfg in self.config.devices:
            if dcfg.mmio.auto:
                if dcfg.id in auto:
                    out.append((dcfg.id, *auto[dcfg.id]))
            elif dcfg.mmio.base is not None and dcfg.mmio.irq is not None:
                out.append((dcfg.id, dcfg.mmio.base, dcfg.mmio.irq))
        return out

    def interrupt_line(self, irq: int) -> XenInterruptLine:
        assert self.dm is not None, "prepare() first"
        line = self._lines.get(irq)
        if line is None:
            line = XenInterruptLine(self.dm, self._irq_method, irq, self.counters, self.log)
            self._lines[irq] = line
        return line

    # -- start ------------------------------------------------------------------------------------
    async def start(self) -> None:
        assert self.dm and self.evtchn and self.fmem and self.libs and self.backends
        assert self.server is not None
        loop = asyncio.get_running_loop()
        libs = self.libs
        self.mapper = XenMapper(self.domid, self.fmem, lambda: GrantTable(libs))
        self.memory = XenGuestMemory(self.mapper, grants=self._grants,
                                     cache_pages=self.xen.map_cache_pages, log=self.log)
        self.bus.attach_memory(self.memory)
        # Every window on the bus must be claimed (prepare mapped the configured ones).
        mapped = set(self.server.ranges)
        for base, size, _w in self.bus.windows():
            if (base, base + size - 1) not in mapped:
                self.server.map_range(base, base + size - 1)
        if self.on_guest is not None:  # resume the devices from the state record
            assert self.xs is not None
            self.on_guest(f"xen:{self.domid}:{self.xs.read(f'/local/domain/{self.domid}/vm')}")
        self.server.attach_loop(loop)  # requests held since prepare() are served from here
        self.server.serve_pending()  # and those a predecessor left in their slots
        self.privcmd = open_fast_path(self.domid, os.path.join(self.dev_dir, "privcmd"),
                                      self._irq_method, self._lines, self.bus, self.server,
                                      loop, self.counters, self.log)
        self._restrict()
        self.log.info("xen_serving", server=self.server.sid, vcpus=self.server.nr_vcpus,
                      windows=len(self.server.ranges), grants=self._grants)

    def _create_server(self, ranges: list[tuple[int, int]] | None = None) -> None:
        """Create and enable the IOREQ server for every configured window.

        Done in prepare(), before devices exist: from the moment it is enabled, a guest access
        to a window waits (its vCPU blocked) until start() serves it, instead of becoming a
        data abort; so InitWait, after which xl unpauses a rebooted guest, can follow at once
        and well inside xl's 10 s wait.
        """
        assert self.dm and self.evtchn and self.fmem and self.backends
        self.server = IoreqServer(self.domid, self.dm, self.evtchn, self.fmem, self.bus,
                                  self.log, self.counters)
        if ranges is None:
            ranges = sorted({(b, b + MMIO_WINDOW_SIZE - 1) for _d, b, _i in self._all_windows()})
        try:
            if record.take_over(self._record, self.domid, self.server, ranges, self.dm, self.log):
                self.backends.serving = True
                self.backends.sync()
                return
            self.server.create(ranges)
        except OSError as exc:
            self.server.destroy()
            self.server = None
            if exc.errno == errno.ENOSYS:
                raise PlatformUnavailable(NO_IOREQ_SERVER) from None
            raise PlatformUnavailable(f"cannot create the IOREQ server for domain "
                                      f"{self.domid}: {exc}") from None
        assert self.server.sid is not None  # create() succeeded
        try:
            record.write_record(self._record, self.domid, self.server.sid)
        except OSError as exc:
            self.log.warning("xen_server_record_failed", path=str(self._record), error=str(exc))
        self.backends.serving = True
        self.backends.sync_known()

    def _restrict(self) -> None:
        """xentoolcore_restrict_all(domid): every handle may then touch only this guest.

        libxenstore and libxengnttab implement "restrict" by pointing their fd at /dev/null
        (xenstore has no per-domain restriction, gntdev cannot be restricted), so the xenstore
        watch connection is closed first and reopened after, and grants open their handle on
        first use, after this.
        """
        assert self.libs is not None and self.backends is not None
        self.backends.suspend_watch()
        rc = self.libs.toolcore.xentoolcore_restrict_all(self.domid)
        if rc < 0:
            self.log.warning("xen_restrict_failed", errno=os.strerror(_errno()))
        else:
            self.restricted = True
            self.log.info("xen_restricted", domid=self.domid,
                          handles=["devicemodel", "foreignmemory", "evtchn", "privcmd"])
        xs = XenStore(self.libs)
        self.xs = xs
        self.backends.resume_watch(xs, asyncio.get_running_loop(), self._on_domain_release)

    # -- the guest goes away ----------------------------------------------------------------------
    def _on_domain_release(self) -> None:
        if self.xs is None or self.finished is None or self.finished.done():
            return
        try:
            if self.xs.domain_introduced(self.domid):
                return
        except XenStoreError:
            return
        self.log.info("xen_domain_gone", domid=self.domid, served=True)
        self.finished.set_result(0)

    # -- stop -------------------------------------------------------------------------------------
    def quiesce(self) -> None:
        if self.server is not None:
            self.server.quiesce()

    async def stop(self) -> None:
        handover = self.handover and self.server is not None and self.server.sid is not None
        if self.backends is not None and handover:  # entries stay as they are
            self.backends.suspend_watch()
        elif self.backends is not None:
            self.backends.close()  # Closed (6) for every entry we served; stop watching
        if self.server is not None:
            sid = self.server.sid
            if handover:  # stopping for a restart: the next instance takes it over
                self.server.leave()
                self.log.info("xen_ioreq_server_left", server=sid)
            else:
                self.server.destroy()
                if sid is not None:
                    record.remove_record(self._record, (self.domid, sid))
        if self.privcmd is not None:
            self.privcmd.close()
            self.privcmd = None
        if self.memory is not None:
            self.memory.close()
        if self.mapper is not None:
            self.mapper.close()
        for name in ("dm", "evtchn", "fmem", "xs"):
            handle: Any = getattr(self, name)
            if handle is not None:
                handle.close()
                setattr(self, name, None)
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(0)
        self.log.info("xen_stopped", **self.counters)

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        if self.memory is not None:
            out.update({f"map_{k}": v for k, v in self.memory.counters.items()})
        return out


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()
