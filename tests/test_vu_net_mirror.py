"""The vhost-user stage's net side by side (tests/e2e/vhost_user/netmirror.py, testpmd.py) without
a guest: the 5-tuple swap, the swapping peer process on a real Unix datagram socket, the
figures from result files written here, and the guest's round lines as the host parses them."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent / "e2e" / "vhost_user"
sys.path.insert(0, str(HERE))

import guestvm
import netmirror
import testpmd

G_MAC, X_MAC = bytes.fromhex("525400e2e102"), bytes.fromhex("020000e2e1fe")
G_IP, X_IP = bytes([169, 254, 79, 2]), bytes([169, 254, 79, 1])


def _udp4(src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    ip = bytes([0x45, 0, 0, 32, 0, 1, 0, 0, 64, 17, 0xAB, 0xCD]) + src + dst
    udp = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes([0, 12, 0x12, 0x34])
    return dst_mac + src_mac + b"\x08\x00" + ip + udp + b"data"


def test_swap5_swaps_macs_addresses_and_ports_like_testpmd() -> None:
    out = _udp4(G_MAC, X_MAC, G_IP, X_IP, 40000, 9)
    back = netmirror.swap5(out)
    assert back == _udp4(X_MAC, G_MAC, X_IP, G_IP, 9, 40000)
    assert netmirror.swap5(back) == out
    # ICMP (an echo request): addresses swapped, the ICMP header untouched.
    icmp = bytearray(out)
    icmp[23] = 1
    swapped = netmirror.swap5(bytes(icmp))
    assert swapped[26:30] == X_IP and swapped[30:34] == G_IP and swapped[34:] == icmp[34:]
    # IPv6 + TCP, behind a VLAN tag.
    v6 = (X_MAC + G_MAC + b"\x81\x00\x00\x05\x86\xdd" + bytes(6) + bytes([6, 64])
          + bytes(range(16)) + bytes(range(16, 32)) + b"\x00\x50\x9c\x40" + bytes(16))
    s6 = netmirror.swap5(v6)
    assert s6[:12] == G_MAC + X_MAC and s6[26:42] == bytes(range(16, 32))
    assert s6[42:58] == bytes(range(16)) and s6[58:62] == b"\x9c\x40\x00\x50"
    # ARP and runts: MACs only, nothing read past the end.
    arp = b"\xff" * 6 + G_MAC + b"\x08\x06" + bytes(28)
    assert netmirror.swap5(arp) == G_MAC + b"\xff" * 6 + b"\x08\x06" + bytes(28)
    assert netmirror.swap5(b"\x01\x02") == b"\x01\x02"
    assert netmirror.swap5(G_MAC + X_MAC + b"\x08\x00\x45") == X_MAC + G_MAC + b"\x08\x00\x45"


def test_the_peer_process_answers_every_frame_swapped(tmp_path: Path) -> None:
    path = tmp_path / "peer.dgram"
    peer = subprocess.Popen([sys.executable, str(HERE / "netmirror.py"), "peer", str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert peer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        me = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        me.bind(str(tmp_path / "me.dgram"))
        me.settimeout(10)
        frames = [_udp4(G_MAC, X_MAC, G_IP, X_IP, 40000 + i, 9) for i in range(20)]
        for f in frames:
            me.sendto(f, str(path))
        got = [me.recv(65536) for _ in frames]
        assert got == [netmirror.swap5(f) for f in frames]
        me.close()
    finally:
        peer.terminate()
        out, _ = peer.communicate(timeout=30)
    assert peer.returncode == 0
    assert json.loads(out.splitlines()[-1]) == {"event": "peer_stopped", "frames": 20,
                                                "dropped": 0}


def test_soname_to_debian_package_name() -> None:
    assert testpmd.soname_package("librte_net_vhost.so.23") == "librte-net-vhost23"
    assert testpmd.soname_package("librte_common_mlx5.so.23") == "librte-common-mlx5-23"
    assert testpmd.soname_package("libpcap.so.0.8") == "libpcap0.8"
    assert testpmd.soname_package("libnuma.so.1") == "libnuma1"


def _line(t: float, text: str) -> dict[str, Any]:
    return {"t": t, "line": text}


def test_net_figures_add_the_rounds_up(tmp_path: Path) -> None:
    lines, samples = [], {}
    for rnd in (1, 2):
        for be, rtt, rx, ticks in (("testpmd", "0.5/1.0/1.5", 2000, 150),
                                   ("vmmiod", "1.0/2.0/3.0", 1000, 50)):
            for size in ("56", "1400"):
                lines.append(_line(1, f"E2E-R mirror be={be} round={rnd} size={size} sent=5 "
                                      f"received=5 rtt={rtt}"))
            lines.append(_line(2, f"E2E-R burst be={be} round={rnd} rc=0 rx={rx} tx={rx}"))
            lines.append(_line(2, f"E2E-R mirror-round be={be} round={rnd} rx={rx + 22} "
                                  f"tx={rx + 22} warmup=0"))
            job = {"jobs": [{"error": 0, "write": {"total_ios": rx, "runtime": 500}}]}
            (tmp_path / f"netburst-{be}-r{rnd}.json").write_text(json.dumps(job))
            samples[f"{be}/{rnd}"] = {"pid": 1, "start": 100, "end": 100 + ticks,
                                      "t_start": 10.0, "t_end": 11.5, "peer_start": 0,
                                      "peer_end": 10}
    lines.append(_line(3, "E2E-R mirror be=vmmiod round=3 size=56 sent=5 received=0 rtt="))
    (tmp_path / "timeline.json").write_text(json.dumps({"lines": lines}))
    (tmp_path / "cpu.json").write_text(json.dumps({"clk_tck": 100, "net_samples": samples}))
    fig = netmirror.net_figures(tmp_path)
    t, v = fig["testpmd"], fig["vmmiod"]
    assert t["ping56"] == {"sent": 10, "received": 10, "rtt_ms": 1.0, "rtt_min_ms": 0.5,
                           "rtt_max_ms": 1.5, "round_rtt_ms": [1.0, 1.0]}
    assert v["ping56"]["sent"] == 15 and v["ping56"]["received"] == 10  # round 3 got nothing
    assert t["burst"]["frames_per_second"] == 4000 and v["burst"]["frames_per_second"] == 2000
    assert t["cpu"]["frames"] == 4044 and t["cpu"]["cpu_seconds"] == 3.0
    assert t["cpu"]["cpu_per_wall"] == 1.0  # busy poll: 1.5 s of CPU per 1.5 s round
    assert v["cpu"]["cpu_us_per_frame"] == round(1.0e6 / 2044, 1)
    assert v["cpu"]["peer_us_per_frame"] == round(0.2e6 / 2044, 1)
    assert fig["ratios"]["rtt56"] == 2.0 and fig["ratios"]["frames_per_second"] == 0.5
    assert fig["ratios"]["round_frames_per_second"] == [0.5, 0.5]
    table = netmirror.net_table(fig)
    assert "busy-polls" in table and "frames/s 0.5" in table


class _Stack:
    def __init__(self) -> None:
        self.net: list[str] = []

    def net_line(self, text: str) -> None:
        self.net.append(text)


def test_the_guests_net_round_lines_reach_the_mirror() -> None:
    """guest.sh's `E2E-N` lines, as the script writes them, are the ones Mirror.on_line parses."""
    script = (HERE / "guest.sh").read_text()
    echoes = re.findall(r'echo "(E2E-N [^"]*)"', script)
    assert sorted(e.split()[1] for e in echoes) == ["done", "end", "idle", "start"], echoes
    g = object.__new__(guestvm.Guest)
    g.lines, g.stack = [], _Stack()  # type: ignore[assignment]
    for text in echoes:
        line = text.replace("$be", "testpmd").replace("$rnd", "2")
        g._on_line(line, 1.0)
    parsed = [re.match(r"E2E-N (start|end) be=(\S+) round=(\d+)", x) for x in g.stack.net]  # type: ignore[attr-defined]
    assert [m.groups() for m in parsed if m] == [("start", "testpmd", "2"),
                                                  ("end", "testpmd", "2")]


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="no apt-cache on this machine")
def test_a_package_apt_does_not_know_is_a_reason_not_an_error(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """No candidate: `status: missing` with the reason (the net side by side is skipped with it),
    no download, no exception; asked again next time (nothing cached as ok)."""
    monkeypatch.setattr(testpmd, "PACKAGE", "vmmiod-no-such-package-for-testpmd")
    logged: list[str] = []
    info = testpmd.Fetch(tmp_path, logged.append).run()
    assert info["status"] == "missing"
    assert "no candidate for vmmiod-no-such-package-for-testpmd" in info["reason"]
    assert json.loads((tmp_path / "dpdk" / "testpmd.json").read_text())["status"] == "missing"
    assert not list(tmp_path.rglob("*.deb"))
    assert testpmd.Fetch(tmp_path).cached(info["key"]) is None
