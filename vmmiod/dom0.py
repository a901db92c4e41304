"""`vmmiod dom0`: the service that follows the Xen toolstack (see docs/xen.md).

It runs in dom0 (or a driver domain) before any guest exists, watches xenstore for the virtio
backend entries xl writes (`backend/virtio_disk` on Xen 4.17, `backend/virtio` on 4.18+) and,
for every new guest there, loads `<config dir>/<domain name>.yaml` and forks an instance that
serves that guest, with that YAML, in a process of its own: `vmmiod run`'s code path
(vmmiod.daemon.run) with the domid the toolstack gave. Forking from a service that has already
imported everything means an instance writes InitWait a fraction of a second after the
toolstack asked, well inside libxl's 10 s even on a slow dom0; a fresh interpreter would spend
seconds on start-up and imports.

The service itself is a plain select() loop with no event loop and no threads of its own, so a
fork is clean: the child resets signals, closes the service's descriptors and runs its own
event loop. Instances that exit are reaped and logged; one that crashed (not 0, 69 or 78) while
its domain still exists is started again, up to RESTART_LIMIT times. A rebooted guest is a new
domain (new domid, new entries): it gets a new instance. A guest without a YAML is left alone
with one log line; a YAML that is invalid or does not match the toolstack's devices fails that
guest only (libxl then reports "unable to add device" after its 10 s: for a backend without a
hotplug script it reads nothing else back).
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import importlib
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmmiod import log as logsetup
from vmmiod.config import Config, ConfigError, load
from vmmiod.systemd import Notifier

EX_OK, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG = 0, 69, 70, 78
RESTART_LIMIT = 3  # restarts of a crashed instance per domain
STOP_GRACE = 20.0  # seconds the instances get to stop after SIGTERM (each stops within 10 s)
TICK = 1.0  # select() timeout: watchdog pings and a rescan that needs no watch
WATCH_TOKEN = "vmmiod-dom0"
SERVICE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)
REASONS = {
    EX_CONFIG: "configuration: the YAML is invalid or does not match the toolstack's devices "
               "(the instance's startup_failed event says which)",
    EX_UNAVAILABLE: "something the guest needs is unavailable (the instance's startup_failed "
                    "event says what)",
    EX_SOFTWARE: "the instance failed (software error; see its log)",
}
FINAL = (EX_OK, EX_UNAVAILABLE, EX_CONFIG)  # exit statuses after which nothing is restarted


@dataclasses.dataclass
class Instance:
    domid: int
    name: str
    config: Path
    pid: int
    restarts: int = 0


Spawner = Callable[[Config], int]


class Dom0Service:
    def __init__(self, config_dir: Path, *, log: Any, backend_domid: int | None = None,
                 loader: Any = None, log_format: str | None = None,
                 log_level: str | None = None, run_dir: Path | None = None,
                 spawn: Spawner | None = None, notifier: Notifier | None = None) -> None:
        self.config_dir = config_dir
        self.log = log
        self.backend_domid = backend_domid
        self._loader = loader
        self.log_format = log_format
        self.log_level = log_level
        self.run_dir = run_dir or Path(
            os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or "/run/vmmiod")
        self.spawn: Spawner = spawn or self._fork_instance
        self.notifier = notifier or Notifier({})
        self.instances: dict[int, Instance] = {}  # running, by domid
        self._guests: dict[int, Any] = {}  # the last scan (names are read once per domain)
        self._configs: dict[Path, tuple[tuple[int, int, int], Config]] = {}
        self.settled: dict[int, str] = {}  # domid -> why it gets no (further) instance
        self.xs: Any = None
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._forward: set[int] = set()  # SIGHUP, SIGUSR1 (counters): for every instance
        self._old_handlers: dict[int, Any] = {}

    # -- set-up -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Xen libraries, xenstore, the watches. Raises PlatformUnavailable (exit 69)."""
        from vmmiod.hypervisors.base import PlatformUnavailable
        from vmmiod.hypervisors.xen.libs import load_libraries
        from vmmiod.hypervisors.xen.toolstack import watch_paths
        from vmmiod.hypervisors.xen.xenstore import XenStore, XenStoreError, parse_number

        libs = load_libraries(self._loader) if self._loader else load_libraries()
        try:
            self.xs = XenStore(libs)
        except XenStoreError as exc:
            raise PlatformUnavailable(
                f"cannot connect to xenstored ({os.strerror(exc.errno or errno.ENOENT)}): start "
                "the Xen services first (xenstored.service, or xencommons)") from None
        if self.backend_domid is None:  # our own domid: 0 in dom0, N in a driver domain
            self.backend_domid = parse_number(self.xs.read("domid")) or 0
        for path in watch_paths(self.backend_domid):
            self.xs.watch(path, WATCH_TOKEN)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        for sig in SERVICE_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def preload(self) -> None:
        """Import what an instance needs and parse the YAMLs now: from the toolstack's request
        to InitWait, libxl's 10 s are running. Then freeze the heap for the garbage collector,
        so that forked instances do not copy every page of it by walking it."""
        from vmmiod import daemon

        for module in ["vmmiod.bus", "vmmiod.mmio", "uvloop",
                       daemon.ADAPTORS["xen"][0], *(m for m, _ in daemon.DEVICES.values())]:
            try:
                importlib.import_module(module)
            except ImportError:
                pass  # the instance reports it (uvloop is optional)
        for path in sorted(self.config_dir.glob("*.yaml")):
            try:
                self._load(path)
            except (ConfigError, OSError):
                pass  # reported when a guest of that name appears
        gc.collect()
        gc.freeze()

    def _load(self, path: Path) -> Config:
        """The parsed YAML, parsed again only when the file changed (errors are not kept: a
        missing image may have appeared since)."""
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._configs.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        config = load(path)
        self._configs[path] = (key, config)
        return config

    def close(self) -> None:
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        if self.xs is not None:
            self.xs.close()
            self.xs = None

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        from vmmiod.hypervisors.base import PlatformUnavailable

        try:
            self.open()
        except PlatformUnavailable as exc:
            self.log.error("dom0_unavailable", message=str(exc))
            self.close()
            return EX_UNAVAILABLE
        self.preload()
        self.log.info("dom0_started", config_dir=str(self.config_dir),
                      backend_domid=self.backend_domid, run_dir=str(self.run_dir))
        self.step(0)
        self.notifier.ready("following the toolstack's virtio backends")
        next_ping = time.monotonic()
        while not self._stopping:
            self.step(TICK)
            if self.notifier.watchdog_interval and time.monotonic() >= next_ping:
                self.notifier.watchdog()
                next_ping = time.monotonic() + self.notifier.watchdog_interval
        self.notifier.stopping()
        self.stop_instances()
        self.log.info("dom0_stopped")
        self.close()
        return EX_OK

    def step(self, timeout: float) -> None:
        """Wait for a watch, a signal or the tick; then reap, rescan, forward."""
        assert self.xs is not None
        fds = [self.xs.fileno(), self._wake_r]
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries select
            ready = []
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        while self.xs.check_watch() is not None:
            pass
        self.reap()
        while self._forward:
            self._signal_all(self._forward.pop())
        if not self._stopping:
            self.scan()

    def _on_signal(self, sig: int, _frame: Any) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            if self._stopping:  # a second one: do not wait for the instances
                self._signal_all(signal.SIGKILL)
            self._stopping = True
        elif sig in (signal.SIGHUP, signal.SIGUSR1):
            self._forward.add(sig)

    # -- guests -----------------------------------------------------------------------------------
    def scan(self) -> None:
        from vmmiod.hypervisors.xen.toolstack import scan
        from vmmiod.hypervisors.xen.xenstore import XenStoreError

        assert self.xs is not None and self.backend_domid is not None
        try:
            guests = self._guests = scan(self.xs, self.backend_domid, self._guests)
        except XenStoreError as exc:
            self.log.warning("dom0_scan_failed", error=str(exc))
            return
        for domid in [d for d in self.settled if d not in guests]:
            del self.settled[domid]  # its entries are gone: forget it
        for domid, guest in sorted(guests.items()):
            if domid in self.instances or domid in self.settled or guest.name is None:
                continue
            if guest.entries or self._xen_yaml(guest.name):
                self._start_guest(domid, guest.name)

    def _xen_yaml(self, name: str) -> bool:
        """A domain without virtio entries (yet) gets its instance early only when it has a
        valid Xen YAML; anything else about it is reported once it has entries, if ever."""
        try:
            return self._load(self.config_dir / f"{name}.yaml").hypervisor.kind == "xen"
        except (ConfigError, OSError):
            return False

    def _start_guest(self, domid: int, name: str, restarts: int = 0) -> None:
        path = self.config_dir / f"{name}.yaml"
        if not path.is_file():
            self.settled[domid] = "no configuration"
            self.log.info("dom0_guest_unconfigured", guest=name, domid=domid, config=str(path))
            return
        try:
            config = self._load(path)
        except ConfigError as exc:
            self.settled[domid] = "invalid configuration"
            self.log.error("dom0_guest_config_invalid", guest=name, domid=domid,
                           config=str(path), problems=list(exc.problems))
            return
        if config.hypervisor.kind != "xen":
            self.settled[domid] = "not a Xen configuration"
            problem = f"{path}: hypervisor.kind is {config.hypervisor.kind!r}, not 'xen'"
            self.log.error("dom0_guest_config_invalid", guest=name, domid=domid,
                           config=str(path), problems=[problem])
            return
        # The toolstack's domid and name, and this service's backend domain, win over the file.
        assert self.backend_domid is not None
        config = dataclasses.replace(
            config, guest=dataclasses.replace(config.guest, name=name, domid=domid),
            hypervisor=dataclasses.replace(config.hypervisor, backend_domid=self.backend_domid,
                                           require_entries=True))
        try:
            pid = self.spawn(config)
        except OSError as exc:
            self.settled[domid] = "fork failed"
            self.log.error("dom0_guest_failed", guest=name, domid=domid, reason=str(exc))
            return
        self.instances[domid] = Instance(domid, name, path, pid, restarts)
        self.log.info("dom0_guest_started", guest=name, domid=domid, pid=pid, config=str(path),
                      restarts=restarts)

    def reap(self) -> None:
        while self.instances:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            inst = next((i for i in self.instances.values() if i.pid == pid), None)
            if inst is None:
                continue
            del self.instances[inst.domid]
            self._exited(inst, os.waitstatus_to_exitcode(status))

    def _exited(self, inst: Instance, code: int) -> None:
        fields = {"guest": inst.name, "domid": inst.domid, "pid": inst.pid, "exit_code": code}
        if code == EX_OK:
            self.settled[inst.domid] = "ended"
            self.log.info("dom0_guest_exited", **fields)
            return
        reason = REASONS.get(code) or (f"killed by {signal.Signals(-code).name}" if code < 0
                                       else f"exit status {code}")
        if code not in FINAL and not self._stopping and inst.restarts < RESTART_LIMIT \
                and self._domain_exists(inst.domid):
            self.log.warning("dom0_guest_restarting", reason=reason, **fields)
            self._start_guest(inst.domid, inst.name, inst.restarts + 1)
            return
        self.settled[inst.domid] = reason
        self.log.error("dom0_guest_failed", reason=reason, **fields)

    def _domain_exists(self, domid: int) -> bool:
        try:
            return bool(self.xs is not None and self.xs.domain_introduced(domid))
        except OSError:
            return False

    # -- stopping ---------------------------------------------------------------------------------
    def _signal_all(self, sig: int) -> None:
        for inst in self.instances.values():
            try:
                os.kill(inst.pid, sig)
            except ProcessLookupError:
                pass

    def stop_instances(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM to every instance (each stops in order), SIGKILL to any left after `grace`."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.instances and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        if self.instances:
            self._signal_all(signal.SIGKILL)
            while self.instances:
                self.reap()
                time.sleep(0.01)

    # -- an instance: fork, then vmmiod.daemon.run in the child -----------------------------------
    def _fork_instance(self, config: Config) -> int:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, SERVICE_SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            return pid
        code = EX_SOFTWARE
        try:
            code = self._instance_main(config, old)
        except BaseException:  # noqa: BLE001 - the child must end here, whatever happened
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

    def _instance_main(self, config: Config, mask: Any) -> int:
        signal.set_wakeup_fd(-1)
        for sig in SERVICE_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the daemon takes it (counters)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # The service's own descriptors: its xenstore connection (whose reader thread did not
        # survive the fork; the instance opens its own) and its wake-up pipe.
        private = [self._wake_r, self._wake_w]
        if self.xs is not None:
            private.append(self.xs.fileno())
        for fd in private:
            try:
                os.close(fd)
            except OSError:
                pass
        self.xs = None
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(key, None)  # systemd talks to the service, not to its instances
        os.environ["RUNTIME_DIRECTORY"] = str(self.run_dir / config.guest.name)
        from vmmiod import daemon

        logsetup.configure(self.log_level or config.log.level,
                           logsetup.resolve_format(self.log_format, config.log.format),
                           config.log.file)
        return daemon.run(config, level_from_cli=self.log_level is not None)


def main(config_dir: Path, *, backend_domid: int | None, log_format: str | None,
         log_level: str | None) -> int:
    """`vmmiod dom0`: what systemd's vmmiod-dom0.service starts (and the e2e dom0 runs)."""
    logsetup.configure(log_level or "info", logsetup.resolve_format(log_format))
    log = logsetup.get_logger(service="dom0")
    svc = Dom0Service(config_dir, log=log, backend_domid=backend_domid, log_format=log_format,
                      log_level=log_level, notifier=Notifier(log=log))
    return svc.run()
