"""`vmmiod demo --json`: a real daemon and the simulated guest; exit 0 and every check passed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXPECTED_CHECKS = {"daemon_started", "daemon_exit_status", "block_workload", "net_workload",
                   "console_workload", "daemon_log_clean", "devices_reset_on_disconnect"}


def test_demo_json_passes(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "vmmiod", "demo", "--json", "--dir",
                          str(tmp_path / "demo")], capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["ok"] is True
    assert {c["name"] for c in result["checks"]} == EXPECTED_CHECKS
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    for kind in ("block", "net", "console"):
        assert result["devices"][kind]["ok"] and not result["devices"][kind]["failures"]
    assert result["devices"]["block"]["bytes_read"] > 0
    assert result["devices"]["net"]["rx_frames"] == result["devices"]["net"]["tx_frames"] > 0
    assert Path(result["log"]).exists() and Path(result["config"]).exists()
    # The one warning the workload asks for: its read past the end of the disk. The harness
    # keeps NOTIFY_SOCKET open as systemd does, so STOPPING=1 arrives (no notify_failed).
    events = [json.loads(line) for line in Path(result["log"]).read_text().splitlines()]
    warnings = {e["event"] for e in events if e["level"] != "info"}
    assert warnings <= {"block_request_malformed"}, warnings


def test_demo_fails_when_the_daemon_cannot_start(tmp_path: Path) -> None:
    """A check that fails makes the exit status non-zero (here: the socket path is a folder)."""
    work = tmp_path / "demo"
    (work / "vmm.sock").mkdir(parents=True)
    (work / "vmm.sock" / "x").write_text("occupied")
    out = subprocess.run([sys.executable, "-m", "vmmiod", "demo", "--json", "--dir", str(work)],
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 1
    result = json.loads(out.stdout)
    assert result["ok"] is False
    assert any(not c["ok"] for c in result["checks"])
