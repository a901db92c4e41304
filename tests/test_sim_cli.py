"""`python -m vmmiod.sim` against a daemon started the way systemd starts it (`vmmiod run`,
Type=notify), twice in a row (disconnect, reconnect), then SIGTERM; and the benchmark entry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vmmiod.bench import main as bench_main
from vmmiod.sim.harness import DaemonProcess, GuestFiles, write_config
from vmmiod.sim.net import udp_peer


def test_sim_cli_against_a_running_daemon(tmp_path: Path) -> None:
    files = GuestFiles(tmp_path, image_size=8 << 20)
    peer = udp_peer()
    port = peer.getsockname()[1]
    peer.close()  # the sim binds it itself (--net-peer)
    write_config(files, net_peer_port=port, on_disconnect="wait")
    with DaemonProcess(files) as daemon:
        for extra in (["--level-irqs", "--vcpus", "2"], []):
            out = subprocess.run(
                [sys.executable, "-m", "vmmiod.sim", "--socket", str(files.socket),
                 "--console", str(files.console), "--net-peer", f"udp:127.0.0.1:{port}",
                 "--image", str(files.image), "--quick", "--json", *extra],
                capture_output=True, text=True, check=False, timeout=120)
            assert out.returncode == 0, out.stderr + out.stdout
            result = json.loads(out.stdout)
            assert result["ok"] and sorted(result["devices"]) == ["block", "console", "net"]
            assert all("skipped" not in r for r in result["devices"].values())
        assert daemon.proc is not None and daemon.proc.poll() is None  # still serving
        assert daemon.stop() == 0
    events = [e["event"] for e in daemon.log_events()]
    assert events.count("vmm_connected") == 2 and events.count("vmm_disconnected") == 2
    assert "guest_protocol_violation" not in events


def test_sim_cli_reports_a_missing_daemon(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "vmmiod.sim", "--socket",
                          str(tmp_path / "nobody.sock"), "--timeout", "0.2"],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 1 and "vmmiod.sim:" in out.stderr


def test_bench_channel_quick_json(capsys) -> None:  # type: ignore[no-untyped-def]
    assert bench_main(["--quick", "--json", "channel"]) == 0
    figures = json.loads(capsys.readouterr().out)["areas"]["channel"]["figures"]
    assert figures["ioreq"]["round_trips_per_s"] > 0
    assert figures["notify_to_interrupt"]["samples"] > 0
    for case in ("block_randread_4k_qd32", "block_randwrite_4k_qd32", "block_seqread_128k_qd8"):
        assert figures[case]["errors"] == 0 and figures[case]["iops"] > 0
    assert figures["net"]["errors"] == 0
