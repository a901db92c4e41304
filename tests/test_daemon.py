"""`vmmiod run` as systemd runs it: a subprocess, a real notify socket, real signals, the
generic adaptor with a simulated VMM, and the JSON log it writes."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmiod.mmio_regs import DEVICE_ID, MAGIC_VALUE, MAGIC_VALUE_VIRT, VERSION
from vmmiod.sim.vmm import SimVmm

CONFIG = """\
guest: {{name: g1}}
hypervisor: {{kind: generic, socket: vmm.sock, on_disconnect: {on_disconnect}}}
log: {{level: info, stats_interval: {stats_interval}{log_extra}}}
devices:
  - type: console
    id: con0
    mmio: {{base: 0x10000000, irq: 5}}
    backend: {{kind: file, path: console.log}}
  - type: block
    id: disk0
    mmio: {{base: 0x10000200, irq: 6}}
    path: disk.img
"""
VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE = 2, 3


class Daemon:
    """One `vmmiod run` with NOTIFY_SOCKET bound by the test."""

    def __init__(self, tmp: Path, *, on_disconnect: str = "wait", log_extra: str = "",
                 env: dict[str, str] | None = None, stats_interval: float = 0.2) -> None:
        self.tmp = tmp
        (tmp / "disk.img").write_bytes(bytes(1 << 20))
        self.config = tmp / "g1.yaml"
        self.config.write_text(CONFIG.format(on_disconnect=on_disconnect, log_extra=log_extra,
                                             stats_interval=stats_interval))
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify"))
        self.messages: list[str] = []
        self.stderr_path = tmp / "stderr.log"
        full_env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify"), **(env or {})}
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmmiod", "run", "--log-format", "json", str(self.config)],
                env=full_env, stdout=subprocess.DEVNULL, stderr=err)

    def wait_for(self, field: str, timeout: float = 20.0) -> list[str]:
        """Notify messages until one carrying `field` (e.g. READY=1)."""
        deadline = time.monotonic() + timeout
        while not any(field in m.split("\n") for m in self.messages):
            self.notify.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except TimeoutError:
                raise AssertionError(f"no {field} within {timeout} s; got {self.messages}; "
                                     f"log:\n{self.stderr_path.read_text()}") from None
        return self.messages

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stderr_path.read_text().splitlines()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.notify.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.close()


def test_run_serves_notifies_and_stops_cleanly_on_sigterm(tmp_path: Path,
                                                          daemons: list[Daemon]) -> None:
    d = Daemon(tmp_path, env={"WATCHDOG_USEC": "200000"})
    daemons.append(d)
    d.wait_for("READY=1")
    assert (tmp_path / "vmm.sock").exists()
    # The windows are really on the bus: a VMM reads each device's identity registers.
    with SimVmm() as vmm:
        vmm.connect(tmp_path / "vmm.sock", wait=5)
        for base, device_id in ((0x10000000, VIRTIO_ID_CONSOLE), (0x10000200, VIRTIO_ID_BLOCK)):
            assert vmm.read(base + MAGIC_VALUE) == MAGIC_VALUE_VIRT
            assert vmm.read(base + VERSION) == 2
            assert vmm.read(base + DEVICE_ID) == device_id
        vmm.disconnect()
    d.wait_for("WATCHDOG=1")
    time.sleep(0.5)  # a couple of periodic counter records
    d.proc.send_signal(signal.SIGTERM)
    d.wait_for("STOPPING=1")
    assert d.proc.wait(20) == 0
    ready = next(m for m in d.messages if "READY=1" in m)
    assert "STATUS=serving 2 device(s) for guest g1" in ready.split("\n")
    assert d.messages.index(ready) < next(i for i, m in enumerate(d.messages) if "STOPPING=1" in m)

    events = d.events()
    names = [e["event"] for e in events]
    assert names[0] == "event_loop_selected" and events[0]["loop"] == "uvloop"
    for name in ("daemon_starting", "barriers_installed", "daemon_ready", "vmm_connected",
                 "vmm_disconnected", "stop_requested", "daemon_stopped"):
        assert name in names, name
    # The host CPU's fences, installed for the generic adaptor too, before the adaptor starts.
    fenced = next(e for e in events if e["event"] == "barriers_installed")
    assert fenced["method"] in ("code_page", "libatomic")
    assert names.index("barriers_installed") < names.index("vmm_connected")
    assert all(e["guest"] == "g1" and e["timestamp"].endswith("Z") for e in events)
    assert not [e for e in events if e["level"] == "error"]
    stats = [e for e in events if e["event"] == "device_stats"]
    assert {e["device"] for e in stats if e["final"] is False} == {"con0", "disk0"}
    final = {e["device"]: e for e in stats if e["final"] is True}
    assert set(final) == {"con0", "disk0"}
    assert final["con0"]["type"] == "console" and "bytes_from_guest" in final["con0"]
    stopped = next(e for e in events if e["event"] == "daemon_stopped")
    assert stopped["exit_code"] == 0 and stopped["signal"] == "SIGTERM"
    assert not (tmp_path / "vmm.sock").exists()  # the adaptor removed its socket


def test_guest_gone_ends_the_daemon_with_the_adaptors_status(tmp_path: Path,
                                                             daemons: list[Daemon]) -> None:
    d = Daemon(tmp_path, on_disconnect="exit", env={"VMMIOD_EVENT_LOOP": "asyncio"})
    daemons.append(d)
    d.wait_for("READY=1")
    with SimVmm() as vmm:
        vmm.connect(tmp_path / "vmm.sock", wait=5)
        assert vmm.read(0x10000000 + MAGIC_VALUE) == MAGIC_VALUE_VIRT
        vmm.disconnect()
    d.wait_for("STOPPING=1")
    assert d.proc.wait(20) == 0
    events = d.events()
    assert events[0]["event"] == "event_loop_selected" and events[0]["loop"] == "asyncio"
    finished = [e for e in events if e["event"] == "guest_finished"]
    assert len(finished) == 1 and finished[0]["exit_code"] == 0
    assert events[-1]["event"] == "daemon_stopped" and events[-1]["signal"] is None


def test_sighup_reopens_the_log_file_and_rereads_the_level(tmp_path: Path,
                                                           daemons: list[Daemon]) -> None:
    d = Daemon(tmp_path, log_extra=", file: daemon.log")
    daemons.append(d)
    d.wait_for("READY=1")
    log = tmp_path / "daemon.log"
    first = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert "daemon_ready" in first
    log.rename(tmp_path / "daemon.log.1")  # what logrotate does
    d.config.write_text(d.config.read_text().replace("level: info", "level: debug"))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not (log.exists() and "logs_reopened" in log.read_text()):
        assert time.monotonic() < deadline, "no logs_reopened in the new log file"
        time.sleep(0.05)
    reopened = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e for e in reopened if e["event"] == "logs_reopened"][0]["log_level"] == "debug"
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(20) == 0
    assert "daemon_stopped" in log.read_text()
    assert "daemon_stopped" not in (tmp_path / "daemon.log.1").read_text()


def test_sigusr1_logs_the_counters_now(tmp_path: Path, daemons: list[Daemon]) -> None:
    """Without periodic records (stats_interval 0), SIGUSR1 logs one device_stats per device,
    with its window's register accesses, and one adaptor_stats: a snapshot on demand."""
    d = Daemon(tmp_path, stats_interval=0)
    daemons.append(d)
    d.wait_for("READY=1")
    with SimVmm() as vmm:
        vmm.connect(tmp_path / "vmm.sock", wait=5)
        for _ in range(3):
            assert vmm.read(0x10000200 + MAGIC_VALUE) == MAGIC_VALUE_VIRT
        vmm.write(0x10000200 + 0x070, 0)  # Status 0: a register write
        d.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not any(e["event"] == "adaptor_stats" for e in d.events()):
            assert time.monotonic() < deadline, "no adaptor_stats after SIGUSR1"
            time.sleep(0.05)
        vmm.disconnect()
    events = d.events()
    stats = {e["device"]: e for e in events if e["event"] == "device_stats"}
    assert set(stats) == {"con0", "disk0"} and not any(e["final"] for e in stats.values())
    disk = stats["disk0"]
    assert disk["mmio_reads"] == 3 and disk["mmio_writes"] == 1, disk
    assert stats["con0"]["mmio_reads"] == 0
    # Per queue (one request queue): notifications, process_queue runs, interrupts.
    assert disk["notifications_q0"] == disk["runs_q0"] == disk["interrupts_q0"] == 0
    adaptor = next(e for e in events if e["event"] == "adaptor_stats")
    assert adaptor["final"] is False and adaptor["bus_requests"] >= 4
    assert d.proc.poll() is None  # still serving
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(20) == 0


def test_sighup_with_a_broken_config_keeps_running(tmp_path: Path,
                                                   daemons: list[Daemon]) -> None:
    d = Daemon(tmp_path)
    daemons.append(d)
    d.wait_for("READY=1")
    d.config.write_text(d.config.read_text().replace("level: info", "level: loud"))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "logs_reopened" not in d.stderr_path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    failed = [e for e in d.events() if e["event"] == "config_reload_failed"]
    assert len(failed) == 1 and "log.level: 'loud'" in failed[0]["problems"][0]
    assert d.proc.poll() is None
    d.proc.send_signal(signal.SIGINT)
    d.wait_for("STOPPING=1")
    assert d.proc.wait(20) == 0


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_second_signal_forces_exit(tmp_path: Path, daemons: list[Daemon], loop: str) -> None:
    """SIGSTOP holds the daemon while both signals become pending, so both reach it before
    it can finish the orderly stop that the first one starts."""
    d = Daemon(tmp_path, env={"VMMIOD_EVENT_LOOP": loop})
    daemons.append(d)
    d.wait_for("READY=1")
    d.proc.send_signal(signal.SIGSTOP)
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGINT)
    d.proc.send_signal(signal.SIGCONT)
    code = d.proc.wait(20)
    events = d.events()
    requested = [e for e in events if e["event"] == "stop_requested"]
    forced = [e for e in events if e["event"] == "stop_forced"]
    assert len(requested) == 1 and len(forced) == 1
    assert {requested[0]["signal"], forced[0]["signal"]} == {"SIGTERM", "SIGINT"}
    assert code == 128 + signal.Signals[str(forced[0]["signal"])].value
    assert "daemon_stopped" not in [e["event"] for e in events]


LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical",
                         "msg"})
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _is_log_method(node: ast.expr) -> bool:
    """`log.warning`, `self.log.debug if c else self.log.warning`, `getattr(log, level)`."""
    if isinstance(node, ast.Attribute):
        return node.attr in LOG_METHODS
    if isinstance(node, ast.IfExp):
        return _is_log_method(node.body) and _is_log_method(node.orelse)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "getattr" and len(node.args) == 2
            and "log" in ast.unparse(node.args[0]).lower())


def _aliased_log_calls(tree: ast.AST) -> set[int]:
    """id() of the calls, in each function, of a local name bound to a log method (`emit =
    log.debug if gone else log.warning; emit("event", ...)`)."""
    out: set[int] = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names = {t.id for a in ast.walk(fn) if isinstance(a, ast.Assign)
                 and _is_log_method(a.value) for t in a.targets if isinstance(t, ast.Name)}
        out.update(id(c) for c in ast.walk(fn) if isinstance(c, ast.Call)
                   and isinstance(c.func, ast.Name) and c.func.id in names)
    return out


def logged_events(root: Path) -> tuple[dict[str, str], list[str]]:
    """Every event name the code under `root` can log, found with `ast`: ({name: file:line},
    [calls whose event name cannot be read]).

    A call counts when it is a log method (`.info(...)` ...) or a wrapper: a function that
    passes one of its parameters as the event of a log method or another wrapper (block's
    `_warn(event, ...)`, the console's `_log_error`), found to a fixed point; or a log method
    reached another way: `getattr(log, level)(...)`, or a local name bound to a log method
    (xenstore's `emit = log.debug if ... else log.warning`). The event is the
    string literal at that position, or both branches of a conditional expression. Anything
    else there (a variable, a call, an f-string that could be a name) is listed as unreadable,
    so a new way of naming events fails the test instead of being skipped.
    """
    trees = [(p, ast.parse(p.read_text(), str(p))) for p in sorted(root.rglob("*.py"))]
    wrappers: dict[str, int] = {}  # function name -> position of the event among call args
    forwarding: set[int] = set()  # id() of the argument a wrapper forwards
    changed = True
    while changed:
        changed = False
        for _, tree in trees:
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
                for call in ast.walk(fn):
                    if not (isinstance(call, ast.Call) and call.args
                            and isinstance(call.args[0], ast.Name)
                            and call.args[0].id in params):
                        continue
                    name = _callee(call)
                    if name in LOG_METHODS or name in wrappers:
                        forwarding.add(id(call.args[0]))
                        if fn.name not in wrappers:
                            i = params.index(call.args[0].id)
                            wrappers[fn.name] = i - 1 if params[0] in ("self", "cls") else i
                            changed = True
    events: dict[str, str] = {}
    unreadable: list[str] = []
    for path, tree in trees:
        aliased = _aliased_log_calls(tree)
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            name = _callee(call)
            direct = name in LOG_METHODS or id(call) in aliased or _is_log_method(call.func)
            pos = 0 if direct else wrappers.get(name or "", -1)
            if pos < 0 or len(call.args) <= pos:
                continue
            where = f"{path.relative_to(root.parent)}:{call.lineno}"
            todo = [call.args[pos]]
            while todo:
                arg = todo.pop()
                if isinstance(arg, ast.IfExp):
                    todo += [arg.body, arg.orelse]
                elif isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if EVENT_NAME.match(arg.value):  # not a sentence (argparse's error())
                        events.setdefault(arg.value, where)
                elif isinstance(arg, ast.JoinedStr) and any(
                        isinstance(v, ast.Constant) and " " in str(v.value) for v in arg.values):
                    continue  # a sentence with spaces is a message, never an event name
                elif id(arg) not in forwarding:
                    unreadable.append(f"{where} {ast.unparse(arg)}")
    return events, unreadable


def test_every_log_event_is_documented() -> None:
    """docs/logging.md lists the stable event names: every one the code can emit is there."""
    root = Path(__file__).resolve().parent.parent
    events, unreadable = logged_events(root / "vmmiod")
    documented = set(re.findall(r"`([a-z0-9_]+)`", (root / "docs" / "logging.md").read_text()))
    assert len(events) > 100, "the scan finds the log calls"
    assert "block_io_error" in events  # through block's _warn wrapper
    assert "xen_backend_entry_invalid" in events  # through xenstore's emit = log.debug/warning
    assert "library_log" in events  # through getattr(log, method)
    assert unreadable == [], "log calls whose event name this test cannot read"
    missing = {name: where for name, where in events.items() if name not in documented}
    assert missing == {}, "events missing from docs/logging.md"


def test_log_event_scan_sees_wrappers_and_conditionals(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "class D:\n"
        "    def _warn(self, event, **kw):\n"
        "        self.log.warning(event, **kw)\n"
        "    def _limited(self, ev):\n"
        "        self._warn(ev)\n"
        "    def run(self, x):\n"
        "        self._warn('via_wrapper')\n"
        "        self._limited('via_two_wrappers')\n"
        "        self.log.info('open' if x else 'closed')\n"
        "        name = x.name\n"
        "        self.log.error(name)\n"
        "        parser.error(f'bad {x}: see --help')\n"
        "    def indirect(self, x, level):\n"
        "        emit = self.log.debug if x else self.log.warning\n"
        "        emit('via_alias', x=x)\n"
        "        getattr(self.log, level)('via_getattr')\n"
        "    def other(self, emit):\n"  # another function's `emit` is none of the scan's business
        "        emit('not_an_event')\n")
    events, unreadable = logged_events(pkg)
    assert set(events) == {"via_wrapper", "via_two_wrappers", "open", "closed", "via_alias",
                           "via_getattr"}
    assert unreadable == ["pkg/m.py:11 name"]


def test_a_second_daemon_leaves_a_running_daemons_socket_alone(tmp_path: Path,
                                                               daemons: list[Daemon]) -> None:
    first = Daemon(tmp_path)
    daemons.append(first)
    first.wait_for("READY=1")
    sock = tmp_path / "vmm.sock"
    inode = sock.stat().st_ino
    other = tmp_path / "second"
    other.mkdir()
    (other / "g1.yaml").write_text(
        f"guest: {{name: g1}}\nhypervisor: {{kind: generic, socket: '{sock}'}}\n"
        "devices:\n  - type: console\n    id: con0\n    mmio: {base: 0x10000000, irq: 5}\n"
        "    backend: {kind: file, path: console.log}\n")
    second = subprocess.run([sys.executable, "-m", "vmmiod", "run", "--log-format", "json",
                             str(other / "g1.yaml")], capture_output=True, text=True, timeout=60)
    assert second.returncode == 69, second.stderr
    assert "in use" in second.stderr and str(sock) in second.stderr
    assert sock.stat().st_ino == inode  # not unlinked and rebound
    with SimVmm() as vmm:  # the first daemon still serves its guest on it
        vmm.connect(sock, wait=5)
        assert vmm.read(0x10000000 + MAGIC_VALUE) == MAGIC_VALUE_VIRT
        vmm.disconnect()
