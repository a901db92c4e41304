"""sd_notify over real datagram sockets, the watchdog, and the unit file (systemd-analyze)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmiod.systemd import Notifier

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "vmmiod@.service"
DOM0_UNIT = UNIT.with_name("vmmiod-dom0.service")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_notify_to_a_path(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving 3 device(s)")
    assert n.status("still serving")
    assert n.stopping()
    assert n.watchdog()
    got = [sock.recv(4096).decode() for _ in range(4)]
    assert got == ["READY=1\nSTATUS=serving 3 device(s)", "STATUS=still serving", "STOPPING=1",
                   "WATCHDOG=1"]
    assert (n.sent, n.failed) == (4, 0)
    n.close()


def test_notify_to_an_abstract_socket() -> None:
    name = f"vmmiod-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog()
    assert n.watchdog_interval is None


def test_unsupported_address_is_not_used() -> None:
    n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and not n.ready()


def test_receiver_gone_is_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()  # the path stays, nobody listens: ECONNREFUSED
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    assert not n.ready()
    assert n.failed == 1


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str],
                                                    interval: float | None) -> None:
    assert Notifier(env).watchdog_interval == interval


def test_watchdog_loop_pings(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})

    async def ping_a_while() -> None:
        task = asyncio.ensure_future(n.watchdog_loop())
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(ping_a_while())
    assert n.sent >= 2
    assert all(sock.recv(4096) == b"WATCHDOG=1" for _ in range(n.sent))


# -- the unit file --------------------------------------------------------------------------------
def unit_settings(unit: Path = UNIT) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_file_settings() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == ["/usr/local/bin/vmmiod run --log-format json /etc/vmmiod/%i.yaml"]
    assert s["Restart"] == ["on-failure"] and s["RestartPreventExitStatus"] == ["78"]
    assert "WatchdogSec" in s and s["ProtectSystem"] == ["strict"]
    assert s["NoNewPrivileges"] == ["yes"] and s["ProtectHome"] == ["yes"]
    assert s["PrivateTmp"] == ["yes"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_IPC_LOCK"]
    assert "char-misc rw" in s["DeviceAllow"]  # /dev/xen/* and /dev/net/tun
    assert s["MemoryDenyWriteExecute"] == ["yes"]  # tests/hardening/test_mdwe.py


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at the vmmiod this test suite runs.
    exe = Path(sys.executable).parent / "vmmiod"
    if not exe.exists():
        pytest.skip(f"no installed vmmiod script next to {sys.executable}")
    text = UNIT.read_text().replace("/usr/local/bin/vmmiod", str(exe))
    instance = tmp_path / "vmmiod@web1.service"
    instance.write_text(text)
    run = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == "", run.stdout + run.stderr  # not even a warning


def test_dom0_unit_file_settings() -> None:
    s = unit_settings(DOM0_UNIT)
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == ["/usr/local/bin/vmmiod dom0 --log-format json"]
    assert s["KillMode"] == ["mixed"]  # SIGTERM to the service, which stops its instances
    assert s["Restart"] == ["on-failure"] and s["RuntimeDirectory"] == ["vmmiod"]
    assert s["Before"] == ["xendomains.service"]
    template = unit_settings(UNIT)
    for key in ("CapabilityBoundingSet", "ProtectSystem", "DevicePolicy", "DeviceAllow",
                "NoNewPrivileges", "PrivateTmp", "RestrictAddressFamilies",
                "MemoryDenyWriteExecute"):
        assert s[key] == template[key], key  # the same hardening as the per-guest template


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_dom0_unit(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "vmmiod"
    if not exe.exists():
        pytest.skip(f"no installed vmmiod script next to {sys.executable}")
    unit = tmp_path / "vmmiod-dom0.service"
    unit.write_text(DOM0_UNIT.read_text().replace("/usr/local/bin/vmmiod", str(exe)))
    run = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == "", run.stdout + run.stderr
