"""The daemon: wires one guest's adaptor, bus, windows and devices from its config, and runs
their lifecycle (start, READY, signals, periodic counters, orderly stop).

This is the only module that knows both the hypervisor adaptors and the devices. Each is
imported by its kind only when a config uses it, so a missing optional part (the Xen bindings
on a machine without Xen) matters only to the configs that need it.

Start: the host CPU's memory fences installed (vmmiod/fences.py) -> adaptor.prepare() ->
devices built and opened -> one VirtioMmio window per device on the bus -> adaptor.start() ->
READY=1. Stop (SIGTERM/SIGINT, or the guest gone): STOPPING=1 ->
bus.detach_memory() (every device resets: no new queue work, no view of guest memory kept) ->
each device's close() (backends flushed and closed, worker threads joined) -> adaptor.stop()
(guest memory unmapped last, once nothing can touch it). The whole stop is bounded.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from vmmiod import __version__, fences
from vmmiod import log as logsetup
from vmmiod.config import MMIO_WINDOW_SIZE, Config, ConfigError, DeviceConfig, MmioConfig, load
from vmmiod.systemd import Notifier

EX_OK = 0
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CONFIG = 78
STOP_TIMEOUT = 10.0  # seconds for the whole orderly stop; the unit's TimeoutStopSec is larger

ADAPTORS = {"generic": ("vmmiod.hypervisors.generic", "GenericAdaptor"),
            "xen": ("vmmiod.hypervisors.xen", "XenAdaptor"),
            "vhost-user": ("vmmiod.hypervisors.vhost_user", "VhostUserAdaptor")}
DEVICES = {"block": ("vmmiod.devices.block", "BlockDevice"),
           "net": ("vmmiod.devices.net", "NetDevice"),
           "console": ("vmmiod.devices.console", "ConsoleDevice")}


class StartupError(Exception):
    """Serving could not start; the message says why, `exit_code` is the process status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _load_class(what: str, module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise StartupError(f"{what} is not available in this installation ({module}.{name}: "
                           f"{exc}); reinstall vmmiod", EX_UNAVAILABLE) from exc


class Daemon:
    def __init__(self, config: Config, *, notifier: Notifier, log: Any,
                 level_from_cli: bool = False, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.config = config
        self.notifier = notifier
        self.log = log
        self.level_from_cli = level_from_cli  # --log-level given: SIGHUP keeps it
        self.stop_timeout = stop_timeout
        self.bus: Any = None
        self.adaptor: Any = None
        self.devices: list[tuple[DeviceConfig, Any]] = []  # opened devices, in config order
        self.windows: list[tuple[str, int, int]] = []  # (device id, base, irq) on the bus
        self._stop: asyncio.Event | None = None
        self._stop_signal: int | None = None
        self._adaptor_started = False
        self.keeper: Any = None  # vmmiod.state.keeper.StateKeeper

    # -- run ------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        loop.add_signal_handler(signal.SIGUSR1, self._log_stats, False)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            self.notifier.close()

    async def _run(self) -> int:
        assert self._stop is not None
        cfg = self.config
        self.log.info("daemon_starting", version=__version__, config=str(cfg.path), pid=os.getpid(),
                      hypervisor=cfg.hypervisor.kind, devices=len(cfg.devices))
        self.notifier.status(f"starting: {cfg.hypervisor.kind} adaptor")
        starting = asyncio.ensure_future(self._start())
        stop_wait = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal during start-up (e.g. while waiting for a domain)
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            self.log.info("startup_interrupted", signal=self._signal_name())
            await self._teardown()
            return EX_OK
        stop_wait.cancel()
        from vmmiod.hypervisors.base import GuestGone

        try:
            starting.result()
        except GuestGone as exc:  # the guest died before it was served: it finished
            self.log.info("guest_finished", exit_code=EX_OK, served=False, message=str(exc))
            self.notifier.status(f"guest gone: {exc}")
            await self._teardown()
            self.log.info("daemon_stopped", exit_code=EX_OK, signal=None)
            return EX_OK
        except StartupError as exc:
            self.log.error("startup_failed", message=str(exc), exit_code=exc.exit_code)
            self.notifier.status(f"failed: {exc}")
            await self._teardown()
            return exc.exit_code
        except Exception as exc:  # a bug: still release what was opened, and say what broke
            self.log.exception("startup_failed", message=repr(exc), exit_code=EX_SOFTWARE)
            self.notifier.status(f"failed: {exc!r}")
            await self._teardown()
            return EX_SOFTWARE
        return await self._serve()

    async def _serve(self) -> int:
        assert self._stop is not None and self.adaptor is not None
        cfg = self.config
        status = f"serving {len(self.devices)} device(s) for guest {cfg.guest.name}"
        self.log.info("daemon_ready", windows=[
            {"device": d, "base": hex(b), "irq": i} for d, b, i in self.windows],
            started_ms=_ms_since_process_start())
        self.notifier.ready(status)
        background = [asyncio.ensure_future(self.notifier.watchdog_loop())]
        if cfg.log.stats_interval > 0:
            background.append(asyncio.ensure_future(self._stats_loop(cfg.log.stats_interval)))
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._stop.wait())}
        if self.adaptor.finished is not None:
            waits.add(self.adaptor.finished)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        code = EX_OK
        finished = self.adaptor.finished
        if finished is not None and finished.done() and not self._stop.is_set():
            code = int(finished.result()) if not finished.exception() else EX_SOFTWARE
            self.log.info("guest_finished", exit_code=code)
            if self.keeper is not None:
                self.keeper.guest_gone()
        else:  # a signal: stopping for a restart, or for good (which the unit cannot tell)
            self.adaptor.handover = True
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self.notifier.stopping("stopping")
        if not await self._teardown():
            code = code or EX_SOFTWARE
        self.log.info("daemon_stopped", exit_code=code, signal=self._signal_name())
        return code

    # -- start-up -------------------------------------------------------------------------------
    async def _start(self) -> None:
        cfg = self.config
        from vmmiod.hypervisors.base import PlatformUnavailable

        bus_cls = _load_class("the MMIO bus", "vmmiod.bus", "MmioBus")
        window_cls = _load_class("the virtio-mmio window", "vmmiod.mmio", "VirtioMmio")
        self.bus = bus_cls(log=self.log)
        kind = cfg.hypervisor.kind
        adaptor_cls = _load_class(f"the {kind} adaptor", *ADAPTORS[kind])
        try:  # a property of the host CPU: before any ring is shared, whatever the adaptor
            fences.install(self.log)
        except OSError as exc:
            raise StartupError(str(exc), EX_UNAVAILABLE) from exc
        try:
            self.adaptor = adaptor_cls(cfg, self.bus, self.log.bind(adaptor=cfg.hypervisor.kind))
            await self.adaptor.prepare()
        except PlatformUnavailable as exc:
            raise StartupError(str(exc), getattr(exc, "exit_code", EX_UNAVAILABLE)) from exc
        discovered = {dev_id: (base, irq) for dev_id, base, irq in self.adaptor.windows()}
        self.notifier.status("starting: opening device backends")
        from vmmiod.devices.base import BackendError

        for dcfg in cfg.devices:
            base, irq = self._window_of(dcfg.id, dcfg.mmio, discovered) \
                if dcfg.vhost_user is None else (0, 0)
            cls = _load_class(f"the {dcfg.type} device", *DEVICES[dcfg.type])
            dlog = self.log.bind(device=dcfg.id)
            device = cls(dcfg, guest=cfg.guest, access_platform=self.adaptor.access_platform,
                         log=dlog)
            try:
                await device.open()
            except BackendError as exc:
                raise StartupError(str(exc), exc.exit_code) from exc
            self.devices.append((dcfg, device))
            if dcfg.vhost_user is not None:  # below the window: the adaptor drives the device
                self.adaptor.add_device(dcfg.id, device, dcfg.vhost_user.path,
                                        dcfg.vhost_user.connect,
                                        dcfg.vhost_user.offers_config(dcfg.type))
                continue
            window = window_cls(device, self.adaptor.interrupt_line(irq),
                                version=dcfg.mmio.version, log=dlog)
            try:
                self.bus.register(base, MMIO_WINDOW_SIZE, window)
            except ValueError as exc:  # bus.BusError: a discovered window overlaps another
                raise StartupError(f"device {dcfg.id!r}: {exc}", EX_CONFIG) from exc
            self.windows.append((dcfg.id, base, irq))
        keeper_cls = _load_class("the state record", "vmmiod.state.keeper", "StateKeeper")
        self.keeper = keeper_cls(cfg.guest.name, self.log)
        self.keeper.open([w for _b, _s, w in self.bus.windows()])
        self.adaptor.on_guest = self.keeper.guest_attached
        try:
            await self.adaptor.start()
        except PlatformUnavailable as exc:
            raise StartupError(str(exc), getattr(exc, "exit_code", EX_UNAVAILABLE)) from exc
        except OSError as exc:
            raise StartupError(f"the {cfg.hypervisor.kind} adaptor cannot start serving: "
                               f"{exc}", EX_UNAVAILABLE) from exc
        self._adaptor_started = True

    def _window_of(self, dev_id: str, mmio: MmioConfig,
                   discovered: dict[str, tuple[int, int]]) -> tuple[int, int]:
        if not mmio.auto:
            assert mmio.base is not None and mmio.irq is not None
            return mmio.base, mmio.irq
        if dev_id not in discovered:
            raise StartupError(f"device {dev_id!r} has 'mmio: auto' but the "
                               f"{self.config.hypervisor.kind} adaptor found no window for it "
                               "(is it declared in the guest's toolstack config?)", EX_CONFIG)
        return discovered[dev_id]

    # -- stop -----------------------------------------------------------------------------------
    async def _teardown(self) -> bool:
        """Quiesce, close, tear down; bounded by stop_timeout. False when a step timed out."""
        deadline = time.monotonic() + self.stop_timeout
        ok = True
        if self.keeper is not None:
            self.keeper.handover()  # what follows (device resets) is not the guest's state
        if self.adaptor is not None and self.adaptor.handover:
            self.adaptor.quiesce()  # no request may meet a window being torn down
        if self.bus is not None:
            self.bus.detach_memory()
        close_connections = getattr(self.adaptor, "close_connections", None)
        if close_connections is not None:  # vhost-user: devices reset, memory unmapped
            close_connections()
        for dcfg, device in reversed(self.devices):
            ok &= await self._bounded(device.close(), deadline, "device_close", device=dcfg.id)
        if self.adaptor is not None:
            ok &= await self._bounded(self.adaptor.stop(), deadline, "adaptor_stop")
        if self.devices:
            self._log_stats(final=True)
        if self.keeper is not None:
            self.keeper.close()
        return ok

    async def _bounded(self, step: Any, deadline: float, name: str, **context: Any) -> bool:
        try:
            await asyncio.wait_for(step, max(0.0, deadline - time.monotonic()))
            return True
        except TimeoutError:
            self.log.error("stop_timeout", step=name, timeout=self.stop_timeout, **context)
        except Exception as exc:  # noqa: BLE001 - one failing step must not keep the others from running
            self.log.error("stop_step_failed", step=name, error=repr(exc), **context)
        return False

    # -- signals --------------------------------------------------------------------------------
    def _on_stop_signal(self, sig: int) -> None:
        assert self._stop is not None
        if self._stop.is_set():
            # A second signal: the operator does not want to wait for the orderly stop.
            self.log.warning("stop_forced", signal=signal.Signals(sig).name)
            os._exit(128 + sig)
        self._stop_signal = sig
        self.log.info("stop_requested", signal=signal.Signals(sig).name)
        self._stop.set()

    def _on_hup(self) -> None:
        logsetup.reopen()
        if not self.level_from_cli:
            try:
                logsetup.set_level(load(self.config.path, check_files=False).log.level)
            except ConfigError as exc:
                self.log.warning("config_reload_failed", problems=exc.problems)
        for dcfg, device in self.devices:
            try:
                device.reopen()
            except Exception as exc:  # noqa: BLE001 - a console file that cannot be reopened keeps the old one
                self.log.warning("device_reopen_failed", device=dcfg.id, error=repr(exc))
        self.log.info("logs_reopened", log_level=logsetup.current_level())

    def _signal_name(self) -> str | None:
        return signal.Signals(self._stop_signal).name if self._stop_signal else None

    # -- counters -------------------------------------------------------------------------------
    async def _stats_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._log_stats(final=False)

    def _log_stats(self, final: bool) -> None:
        """One device_stats record per device (its window's counters as mmio_*), one
        adaptor_stats record. Also on SIGUSR1, for a snapshot of the counters at any time."""
        windows: dict[int, Any] = {}
        if self.bus is not None:
            windows = {id(getattr(w, "device", None)): w for _b, _s, w in self.bus.windows()}
        for dcfg, device in self.devices:
            window_stats = getattr(windows.get(id(device)), "stats", None)
            mmio = {f"mmio_{k}": v for k, v in window_stats().items()} if window_stats else {}
            self.log.info("device_stats", **{**device.stats(), **mmio, "device": dcfg.id,
                                             "type": dcfg.type, "final": final})
        if self.adaptor is not None:
            extra = {"bus_requests": getattr(self.bus, "requests", 0)}
            self.log.info("adaptor_stats", **{**self.adaptor.stats(), **extra,
                                              "adaptor": self.config.hypervisor.kind,
                                              "final": final})


def _ms_since_process_start() -> float | None:
    """Milliseconds since this process was started (restart time, docs/restart.md)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime, ticks since boot
        return round((time.clock_gettime(time.CLOCK_BOOTTIME) - started) * 1000, 1)
    except (OSError, ValueError, IndexError):
        return None


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop], dict[str, Any]]:
    """uvloop when importable (and not refused by VMMIOD_EVENT_LOOP=asyncio), else asyncio."""
    if os.environ.get("VMMIOD_EVENT_LOOP") == "asyncio":
        return asyncio.new_event_loop, {"loop": "asyncio", "reason": "VMMIOD_EVENT_LOOP=asyncio"}
    try:
        import uvloop
    except ImportError as exc:
        return asyncio.new_event_loop, {"loop": "asyncio", "reason": f"uvloop: {exc}"}
    return uvloop.new_event_loop, {"loop": "uvloop",
                                   "version": getattr(uvloop, "__version__", "?")}


def run(config: Config, *, level_from_cli: bool = False) -> int:
    """`vmmiod run`: serve one guest until stopped. Logging is configured by the caller."""
    # A known domid (given in the YAML, or by the dom0 service) tells instances apart in a log
    # that several share.
    extra = {} if config.guest.domid is None else {"domid": config.guest.domid}
    log = logsetup.get_logger(guest=config.guest.name, **extra)
    notifier = Notifier(log=log)
    factory, loop_info = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        log.info("event_loop_selected", **loop_info)
        daemon = Daemon(config, notifier=notifier, log=log, level_from_cli=level_from_cli)
        return runner.run(daemon.run())
