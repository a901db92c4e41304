"""`vmmiod run` with `hypervisor: {kind: vhost-user}`: a real daemon process serving a block
device and a console on their sockets to the Python front-end, stopped with SIGTERM, and
killed with SIGKILL mid-I/O and started again (reconnect with the inflight record)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.vhost_user_peer import BLK_T_IN, BLK_T_OUT, FrontEnd, blk_request, connect

CONFIG = """\
guest: {name: vu}
hypervisor: {kind: vhost-user, reconnect: 0.1}
log: {level: info, stats_interval: 0}
devices:
  - type: block
    id: disk0
    vhost_user: disk0.sock
    path: disk.img
  - type: console
    id: con0
    vhost_user: {socket: con0.sock}
    backend: {kind: file, path: console.log}
"""


class Daemon:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "vu.yaml"
        if not self.config.exists():
            self.config.write_text(CONFIG)
            with open(tmp / "disk.img", "wb") as f:
                f.truncate(4 << 20)
        self.log_path = tmp / "daemon.log"
        self.start()

    def start(self) -> None:
        self.err = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmmiod", "run", "--log-format", "json", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=self.err)

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(20)
        self.err.close()
        return code


def test_daemon_serves_block_over_vhost_user_and_stops_cleanly(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        fe = FrontEnd(connect(str(tmp_path / "disk0.sock")))
        try:
            fe.negotiate()
            fe.add_mem_reg()
            fe.start_ring(0)
            data = os.urandom(4096)
            blk_request(fe, 0, BLK_T_OUT, 16, data, token="w")
            fe.kick(0)
            assert fe.wait_used(0) == [("w", 1)]
            _, buf, _ = blk_request(fe, 0, BLK_T_IN, 16, read_len=4096, token="r")
            fe.kick(0)
            assert fe.wait_used(0) == [("r", 4097)]
            assert fe.memory.read(buf, 4096) == data
            assert d.stop() == 0
            assert fe.closed_by_peer()
        finally:
            fe.close()
    finally:
        d.stop()
    events = [e["event"] for e in d.events()]
    assert "vhost_user_listening" in events and "vhost_user_ring_started" in events
    assert events[-1] == "daemon_stopped"
    assert not (tmp_path / "disk0.sock").exists()  # the daemon removed its sockets
