"""The real-Xen e2e's network figures: where a ping's and a TCP segment's time goes.

domU-netperf.sh (in the guest, boot 1) frames each phase (block reads at queue depth 1, 20
pings, a bounded TCP transfer each way) with snapshots that dom0_netperf.py takes of vmmiod's
counters (SIGUSR1), CPU times and the TAP; netperf_report.py turns them into per-ping and
per-segment figures. These tests check that the measurement is complete and consistent and
print the figures (also written to netperf-summary.txt); speed itself is never asserted.
Results come from the same place as test_xen_e2e.py's (VMMIOD_E2E_RESULTS).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import netperf_report


@pytest.fixture(scope="module")
def results() -> Path:
    d = os.environ.get("VMMIOD_E2E_RESULTS")
    if not d:
        pytest.skip("real-Xen e2e: set VMMIOD_E2E_RESULTS=<dir of a run> (.ci/e2e does)")
    path = Path(d)
    params = path / "params.json"
    if params.exists() and json.loads(params.read_text()).get("E2E_MODE") != "full":
        pytest.skip(f"the run in {path} was not a full one")
    return path


@pytest.fixture(scope="module")
def snaps(results: Path) -> dict[str, dict[str, Any]]:
    assert (results / "netperf.jsonl").exists(), \
        f"no netperf.jsonl in {results}: the guest's netperf phases did not run"
    return netperf_report.load(results)


@pytest.fixture(scope="module")
def figures(snaps: dict[str, dict[str, Any]], results: Path) -> dict[str, Any]:
    f = netperf_report.figures(snaps)
    text = netperf_report.table(f)
    (results / "netperf-summary.txt").write_text(text + "\n")
    (results / "netperf-summary.json").write_text(json.dumps(f, indent=1) + "\n")
    print("\n" + text)
    return f


def test_every_snapshot_has_the_daemons_counters(snaps: dict[str, dict[str, Any]]) -> None:
    for label in (f"{p}-{s}" for p in netperf_report.PHASES for s in "ab"):
        rec = snaps.get(label)
        assert rec is not None, f"snapshot {label} missing"
        assert "error" not in rec and "error" not in rec.get("vmmiod", {}), rec
        vm = rec["vmmiod"]
        assert {"net0", "disk0"} <= set(vm["devices"]), label
        net = vm["devices"]["net0"]
        for key in ("mmio_reads", "mmio_writes", "notifications_q1", "runs_q1", "rx_wakeups",
                    "interrupts_q0", "interrupts_q1"):
            assert key in net, (label, key)
        assert "wakeups" in vm["adaptor"] and "ioreqs" in vm["adaptor"]


def test_counters_only_grow_between_snapshots(snaps: dict[str, dict[str, Any]]) -> None:
    order = sorted(snaps.values(), key=lambda r: r["t"])
    for a, b in itertools.pairwise(order):
        fa, fb = netperf_report.flat(a), netperf_report.flat(b)
        shrunk = {k: (fa[k], fb[k]) for k in fa.keys() & fb.keys()
                  if k != "t" and fb[k] < fa[k]}
        assert not shrunk, f"{a['label']} -> {b['label']}: {shrunk}"


def test_phases_did_their_work(figures: dict[str, Any], snaps: dict[str, dict[str, Any]]) -> None:
    assert figures["block_qd1"]["requests"] == 100 and figures["block_qd1"]["ms_per_request"] > 0
    # Each 4 KiB read at queue depth 1 is at least one kick and one interrupt.
    assert figures["block_qd1"]["kicks"] >= 0.9 and figures["block_qd1"]["guest_irqs"] >= 0.9
    assert figures["ping"]["received"] == figures["ping"]["pings"] == 20
    for phase in ("up", "down"):
        guest = snaps[f"{phase}-b"]["guest"]
        assert guest["rc"] == "0", (phase, guest)
        assert int(guest["bytes"]) == 1 << 20, (phase, guest)
        assert figures[phase]["mbit_s"] and figures[phase]["frames"] > 0


def test_the_device_saw_what_the_guest_sent_and_got(snaps: dict[str, dict[str, Any]]) -> None:
    """vmmiod's frame counters and the guest's eth0 counters agree over the TCP phases, up to
    the frames of the snapshot exchange itself (the guest reads its counters before sending
    the line, vmmiod's are read when it arrives)."""
    slack = netperf_report.delta(snaps, "cal")["guest.tx_packets"] + 2
    for phase in ("up", "down"):
        d = netperf_report.delta(snaps, phase)
        assert abs(d["net.tx_frames"] - d["guest.tx_packets"]) <= slack, (phase, d)
        assert abs(d["net.rx_frames"] - d["guest.rx_packets"]) <= slack, (phase, d)
        # 1 MiB crosses in at least 1 MiB / 64 KiB (the largest GSO frame) = 16 data frames;
        # how many more, and how many ACK frames go back, depends on the segment sizes both
        # kernels pick (a CI run saw 42 guest ACK frames for 99 frames of ~10 KB downstream).
        sent, got = ("tx", "rx") if phase == "up" else ("rx", "tx")
        assert d[f"net.{sent}_frames"] >= 16 and d[f"net.{got}_frames"] > 0, (phase, d)


def test_figures_are_printed(figures: dict[str, Any], results: Path) -> None:
    text = (results / "netperf-summary.txt").read_text()
    assert "ping: median" in text and "TCP guest->dom0" in text and "goals (" in text
    assert set(figures["goals"]) >= {"up_over_down", "ping_median_over_block_ms"}


def test_interleaved_rounds_timed_both_sides(figures: dict[str, Any],
                                             snaps: dict[str, dict[str, Any]]) -> None:
    """The goals' ratios come from the guest's interleaved rounds: every round timed its block
    reads, its pings and both transfers in full."""
    r = figures.get("rounds")
    assert r, "netperf.jsonl has no rounds-b snapshot (domU-netperf.sh's interleaved rounds)"
    assert r["rounds"] == 4 and len(r["block_ms_per_round"]) == 4, r
    assert all(ms > 0 for ms in r["block_ms_per_round"]), r
    assert r["pings"] >= 16, r  # 5 per round; a ping or two may time out under TCG
    assert r["transfer_rounds"] == 4, r  # every download came back whole
    # The block reads were what they should be: 4 x 100 reads, one interrupt each at most
    # (a read past the disk's end made busybox dd read the whole disk once).
    irqs = netperf_report.delta(snaps, "rounds")["guest.blk_irqs"]
    assert 0 < irqs <= 4 * 100 + 20, irqs
    assert figures["goals"]["from"] == "interleaved rounds"
