"""The `vmmiod` command line: exit codes and output, run as a user would (a subprocess)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmiod import __version__
from vmmiod.cli import _delegate_split

GOOD = """\
guest: {name: g1}
hypervisor: {kind: generic, socket: vmm.sock}
devices:
  - type: block
    id: disk0
    mmio: {base: 0x10000000, irq: 5}
    path: disk.img
    readonly: true
  - type: console
    id: con0
    mmio: {base: 0x10000400, irq: 7}
    ports:
      - {name: console, backend: {kind: socket, path: con.sock}}
      - {name: agent, backend: {kind: file, path: agent.log}}
  - type: net
    id: net0
    mmio: {base: 0x10000200, irq: 6}
    backend: {kind: dgram, local: "udp:127.0.0.1:5555", remote: "udp:127.0.0.1:5556"}
"""


def vmmiod(*args: str, cwd: Path | None = None, timeout: float = 60,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmmiod", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def good(tmp_path: Path) -> Path:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    path = tmp_path / "g1.yaml"
    path.write_text(GOOD)
    return path


def test_version() -> None:
    run = vmmiod("--version")
    assert run.returncode == 0
    assert run.stdout.strip() == f"vmmiod {__version__}"


@pytest.mark.parametrize("args", [[], ["run"], ["check"]])
def test_help_everywhere(args: list[str]) -> None:
    run = vmmiod(*args, "--help")
    assert run.returncode == 0
    assert run.stdout.startswith(f"usage: vmmiod {' '.join(args)}".rstrip())
    assert "--log-format" in run.stdout and "--log-level" in run.stdout


def test_no_command_is_a_usage_error() -> None:
    run = vmmiod()
    assert run.returncode == 2
    assert "required: COMMAND" in run.stderr


def test_check_good_config_prints_what_would_be_served(good: Path) -> None:
    run = vmmiod("check", str(good))
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.splitlines()[0] == f"{good}: OK"
    assert "guest       g1 (domid auto)" in out
    assert f"generic (socket {good.parent / 'vmm.sock'}, on disconnect wait)" in out
    assert "disk0      block    window 0x10000000-0x100001ff irq 5" in out
    assert "net0       net      window 0x10000200-0x100003ff irq 6" in out
    assert "con0       console  window 0x10000400-0x100005ff irq 7" in out
    assert f"image {good.parent / 'disk.img'} (read-only, cache writeback" in out
    assert "dgram udp:127.0.0.1:5555 -> udp:127.0.0.1:5556" in out
    assert (f"ports console: socket {good.parent / 'con.sock'}; agent: file "
            f"{good.parent / 'agent.log'} (multiport)") in out
    assert run.stderr == ""
    # check touches nothing: no socket, no console log, the image unchanged
    assert not (good.parent / "vmm.sock").exists() and not (good.parent / "agent.log").exists()


def test_check_json(good: Path) -> None:
    run = vmmiod("check", "--json", str(good))
    assert run.returncode == 0
    data = json.loads(run.stdout)
    assert data["guest"] == {"name": "g1", "domid": None}
    assert [d["id"] for d in data["devices"]] == ["disk0", "con0", "net0"]
    assert data["devices"][0]["mmio"] == {"base": 0x10000000, "irq": 5, "version": 2,
                                          "auto": False}


def test_check_to_a_closed_pipe_says_nothing(good: Path) -> None:
    """`vmmiod check --json F | head -1`: the reader is gone before vmmiod writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = subprocess.run([sys.executable, "-m", "vmmiod", "check", "--json", str(good)],
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert run.stderr == ""
    assert run.returncode == 0


def test_check_bad_config_lists_every_problem_and_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "web1.yaml"
    bad.write_text(GOOD.replace("0x10000200", "0x10000100").replace("irq: 7", "irq: 5")
                   .replace("readonly: true", "readonyl: true"))
    run = vmmiod("check", str(bad))
    assert run.returncode == 78
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        f"{bad}:7: devices[0].path: backing file {tmp_path / 'disk.img'} does not exist",
        f"{bad}:8: devices[0].readonyl: unknown key (did you mean 'readonly'?)",
        f"{bad}:11: devices[1].mmio.irq: irq 5 is already used by devices[0] ('disk0')",
        f"{bad}:17: devices[2].mmio.base: 0x10000100 is not aligned to 0x200",
        f"{bad}: 4 problems; nothing would be served",
    ]


def test_check_no_files_skips_host_checks(tmp_path: Path) -> None:
    path = tmp_path / "g1.yaml"
    path.write_text(GOOD)  # disk.img does not exist here
    assert vmmiod("check", str(path)).returncode == 78
    assert vmmiod("check", "--no-files", str(path)).returncode == 0


def test_check_missing_file() -> None:
    run = vmmiod("check", "/nonexistent/g1.yaml")
    assert run.returncode == 78
    assert "/nonexistent/g1.yaml:0: (file): cannot read it: No such file or directory" in run.stderr


def test_run_refuses_bad_config_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "g1.yaml"
    bad.write_text(GOOD.replace("kind: generic", "kind: generc"))
    run = vmmiod("run", str(bad))
    assert run.returncode == 78
    assert ("hypervisor.kind: 'generc' is not one of xen, generic, vhost-user (did you mean 'generic'?)"
            in run.stderr)
    assert f"{bad}: invalid configuration; not starting" in run.stderr
    assert not (tmp_path / "vmm.sock").exists()


@pytest.fixture
def failing(good: Path) -> Iterator[Path]:
    """A config whose net backend cannot open: its UDP port is already taken (by the test)."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    good.write_text(good.read_text().replace("udp:127.0.0.1:5555", f"udp:127.0.0.1:{port}"))
    yield good
    taken.close()


def test_run_backend_failure_exits_69_and_leaves_nothing(failing: Path) -> None:
    run = vmmiod("run", "--log-format", "json", str(failing), timeout=30)
    assert run.returncode == 69, run.stderr
    events = [json.loads(line) for line in run.stderr.splitlines()]
    failed = [e for e in events if e["event"] == "startup_failed"]
    assert len(failed) == 1 and failed[0]["exit_code"] == 69 and failed[0]["level"] == "error"
    assert "net0" in failed[0]["message"] and "Address already in use" in failed[0]["message"]
    assert not (failing.parent / "vmm.sock").exists()  # the adaptor never listened
    assert not (failing.parent / "con.sock").exists()  # the console opened before was closed


def test_log_format_flag_and_config(failing: Path) -> None:
    """--log-format wins; without it the config's log.format applies; auto = JSON off a TTY."""
    auto = vmmiod("run", str(failing))
    assert auto.returncode == 69
    assert auto.stderr and all(line.startswith("{") for line in auto.stderr.splitlines())
    console = vmmiod("run", "--log-format", "console", str(failing))
    assert "startup_failed" in console.stderr and not console.stderr.startswith("{")
    failing.write_text(failing.read_text().replace("devices:", "log: {format: console}\ndevices:"))
    assert "startup_failed" in vmmiod("run", str(failing)).stderr
    assert not vmmiod("run", str(failing)).stderr.startswith("{")
    assert vmmiod("--log-format", "json", "run", str(failing)).stderr.startswith("{")


def test_log_level_flag(failing: Path) -> None:
    quiet = vmmiod("run", "--log-level", "error", "--log-format", "json", str(failing))
    events = [json.loads(line) for line in quiet.stderr.splitlines()]
    assert [e["event"] for e in events] == ["startup_failed"]


def test_delegate_split() -> None:
    assert _delegate_split(["demo", "--json"]) == ([], "demo", ["--json"])
    assert _delegate_split(["--log-level", "debug", "bench", "--quick", "run"]) == (
        ["--log-level", "debug"], "bench", ["--quick", "run"])
    assert _delegate_split(["run", "demo"]) is None
    assert _delegate_split(["check", "x.yaml"]) is None


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_delegated_commands_get_their_arguments(command: str) -> None:
    module = f"vmmiod.{command}"
    run = vmmiod(command, "--help")
    has_entry = importlib.util.find_spec(module) is not None
    if command == "bench" and has_entry:
        has_entry = hasattr(importlib.import_module(module), "main")
    if has_entry:
        assert run.returncode == 0, run.stderr
        assert "usage:" in run.stdout  # the delegate's own parser answered --help
    else:
        assert run.returncode == 69
        assert f"vmmiod {command} is not available in this installation" in run.stderr
