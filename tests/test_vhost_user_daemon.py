"""`vmmiod run` with `hypervisor: {kind: vhost-user}`: a real daemon process serving a block
device and a console on their sockets to the Python front-end, stopped with SIGTERM, and
killed with SIGKILL mid-I/O and started again (reconnect with the inflight record)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.vhost_user_peer import BLK_T_IN, BLK_T_OUT, FrontEnd, blk_request
from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.sim.sockets import connect_unix as connect

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
                f.truncate(8 << 20)
        self.log_path = tmp / "daemon.log"
        self.start()

    def start(self) -> None:
        with open(self.log_path, "a") as err:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmmiod", "run", "--log-format", "json",
                 str(self.config)], stdout=subprocess.DEVNULL, stderr=err)

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
        return self.proc.wait(20)


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
    final = [e for e in d.events() if e["event"] == "adaptor_stats" and e["final"]]
    assert final and final[0]["connections"] == 1 and final[0]["messages"] > 10
    assert events[-1] == "daemon_stopped"
    assert not (tmp_path / "disk0.sock").exists()  # the daemon removed its sockets


def _reconnect(fe: FrontEnd, sock: str, info: w.Inflight, inflight_fd: int) -> None:
    """What QEMU does after `reconnect=N` finds the back-end again (vhost_user_blk_connect,
    then vhost_user_blk_start with the inflight buffer it kept)."""
    fe.sock = connect(sock, timeout=30)
    fe.negotiate()
    fe.add_mem_reg()
    fe.ack(w.SET_INFLIGHT_FD, w.pack_inflight(info), (inflight_fd,))


def test_sigkill_mid_io_then_restart_reconnects_and_every_request_completes(
        tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    sock = str(tmp_path / "disk0.sock")
    fe = FrontEnd(connect(sock), ram_size=64 << 20)
    inflight_fd = -1
    try:
        fe.negotiate()
        fe.add_mem_reg()
        fe.send(w.GET_INFLIGHT_FD, w.pack_inflight(w.Inflight(0, 0, 1, 128)))
        payload, fds = fe.recv_reply_fds(w.GET_INFLIGHT_FD)
        info, inflight_fd = w.Inflight(*w.INFLIGHT.unpack(payload)), fds[0]
        fe.ack(w.SET_INFLIGHT_FD, w.pack_inflight(info), (inflight_fd,))
        ring = fe.start_ring(0, size=128)
        chunk = 64 << 10
        total, depth = 128, 32
        pattern = [os.urandom(16) * (chunk // 16) for _ in range(total)]
        status: dict[int, int] = {}
        submitted = done = 0
        kills = 0
        deadline = time.monotonic() + 120
        while done < total:
            assert time.monotonic() < deadline, f"{done}/{total} completed"
            while submitted < total and submitted - done < depth:
                _, _, st = blk_request(fe, 0, BLK_T_OUT, submitted * chunk // 512,
                                       pattern[submitted], token=submitted)
                status[submitted] = st
                submitted += 1
            fe.kick(0)
            if kills < 3 and done >= 24 * (kills + 1):
                # Killed while it works through a fresh batch of 32: chains popped, some
                # written and added to the used ring but not published, the rest not popped.
                time.sleep(0.002 * kills)
                d.proc.send_signal(signal.SIGKILL)
                d.proc.wait(10)
                kills += 1
                d.start()
                _reconnect(fe, sock, info, inflight_fd)
                fe.rings.pop(0)
                os.close(ring.kick)
                os.close(ring.call)
                ring = fe.start_ring(0, base=ring.q.used_idx(), q=ring.q)
            for token, length in ring.q.drain_used():
                assert length == 1 and fe.memory.read(status[token], 1) == b"\0", token
                done += 1
            fe.wait_call(0, 0.05)
        image = (tmp_path / "disk.img").read_bytes()
        for i in range(total):
            assert image[i * chunk:(i + 1) * chunk] == pattern[i], f"request {i}"
        assert d.stop() == 0
    finally:
        fe.close()
        if inflight_fd >= 0:
            os.close(inflight_fd)
        d.stop(signal.SIGKILL)
    events = d.events()
    names = [e["event"] for e in events]
    assert names.count("daemon_starting") == 4
    resumed = [e for e in events if e["event"] == "vhost_user_inflight_resumed"]
    assert len(resumed) == 3, "each new daemon resumed from the inflight record"
    print("requests redone after each SIGKILL:", [e["resubmit"] for e in resumed])



NET_CONFIG = """\
guest: {name: vu}
hypervisor: {kind: vhost-user, reconnect: 0.1}
log: {level: info, stats_interval: 0}
devices:
  - type: block
    id: disk0
    vhost_user: DISK0
    path: disk.img
  - type: net
    id: net0
    vhost_user: NET0
    backend: {kind: dgram, local: "udp:127.0.0.1:0"}
"""


def _offered(tmp: Path, disk0: str, net0: str, get_config_on_net: bool = False) -> dict[str, int]:
    """GET_PROTOCOL_FEATURES of both devices of `vmmiod run` (NET_CONFIG with these endpoints)."""
    (tmp / "vu.yaml").write_text(NET_CONFIG.replace("DISK0", disk0).replace("NET0", net0))
    with open(tmp / "disk.img", "wb") as f:
        f.truncate(1 << 20)
    d = Daemon(tmp)
    offered = {}
    try:
        for name in ("disk0", "net0"):
            fe = FrontEnd(connect(str(tmp / f"{name}.sock"), timeout=30))
            try:
                offered[name] = fe.call_u64(w.GET_PROTOCOL_FEATURES)
                if name == "net0" and get_config_on_net:
                    fe.negotiate()
                    fe.send(w.GET_CONFIG, w.CONFIG_HEAD.pack(0, 6, 0) + bytes(6))
                    assert fe.closed_by_peer()  # CONFIG not negotiated: a violation
            finally:
                fe.close()
        assert d.stop() == 0
    finally:
        d.stop(signal.SIGKILL)
    violations = [e["reason"] for e in d.events()
                  if e["event"] == "vhost_user_protocol_violation"]
    assert violations == (["not_negotiated"] if get_config_on_net else []), violations
    return offered


def test_net_does_not_offer_config_block_does(tmp_path: Path) -> None:
    """QEMU's virtio-net (-netdev vhost-user) keeps the config space itself and QEMU 7.2 warns
    "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not" when a net
    back-end offers it; QEMU's vhost-user-blk refuses a back-end without it."""
    offered = _offered(tmp_path, "disk0.sock", "net0.sock", get_config_on_net=True)
    assert offered["disk0"] == w.PROTOCOL_FEATURES
    assert offered["net0"] == w.PROTOCOL_FEATURES & ~(1 << w.PROTOCOL_F_CONFIG)


def test_vhost_user_config_key_overrides_the_device_type(tmp_path: Path) -> None:
    offered = _offered(tmp_path, "{socket: disk0.sock, config: false}",
                       "{socket: net0.sock, config: true}")
    assert offered["disk0"] == w.PROTOCOL_FEATURES & ~(1 << w.PROTOCOL_F_CONFIG)
    assert offered["net0"] == w.PROTOCOL_FEATURES
