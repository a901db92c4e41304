"""Assertions on a vhost-user end-to-end run: Linux's virtio-blk and virtio-net drivers in an
x86_64 guest under QEMU (TCG), with vmmiod as their vhost-user backend (tests/e2e/vhost_user/run
boots it; see docs/e2e.md).

These tests read the run's result files; they never boot anything themselves unless asked:
- VMMIOD_VU_RESULTS=DIR: check the results in DIR (what .ci/e2e-vhost-user does after `run`);
- VMMIOD_VU_E2E=1: run the harness first (build + boot, minutes), then check.
Otherwise they are skipped, so the unit-test stage stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
# Lines in the guest's kernel log that mean an I/O reached an application or a filesystem as an
# error (blk_update_request is 5.x, "I/O error, dev" 6.x), or a kernel BUG/WARNING (a driver that
# met a device breaking the rules). Not a bare "Call Trace": an RCU stall report prints one when
# the loaded host starves the emulated CPU (seen during boot at load 9), which says nothing
# about the devices; such reports are printed, not failed.
DMESG_BAD = re.compile(r"I/O error|blk_update_request|Buffer I/O|EXT4-fs error"
                       r"|virtio_blk.*(fail|err)|BUG:|WARNING:", re.IGNORECASE)
# vmmiod's log events that say something went wrong (docs/logging.md); besides these, nothing
# may be logged at warning level or above (a well-behaved QEMU and guest, a clean restart).
BAD_EVENTS = {"guest_protocol_violation", "device_needs_reset", "stop_timeout",
              "stop_step_failed", "startup_failed", "vhost_user_protocol_violation",
              "vhost_user_error", "vhost_user_inflight_invalid", "vhost_user_device_fault"}


def _results_dir() -> Path | None:
    if os.environ.get("VMMIOD_VU_RESULTS"):
        return Path(os.environ["VMMIOD_VU_RESULTS"])
    if os.environ.get("VMMIOD_VU_E2E") == "1":
        cache = Path(os.environ.get("VMMIOD_VU_CACHE", Path.home() / ".cache/vmmiod/vhost-user"))
        results = cache / "results"
        subprocess.run([sys.executable, str(HERE / "run"), "--results", str(results)],
                       check=False)
        return results
    return None


class Run:
    """One run's result files, parsed."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.info: dict[str, Any] = json.loads((d / "run.json").read_text())
        self.params: dict[str, Any] = json.loads((d / "params.json").read_text())
        timeline = json.loads((d / "timeline.json").read_text())
        # The kill and restart events (the CPU placement's are in timeline.json too).
        self.events: list[dict[str, Any]] = [e for e in timeline["host_events"]
                                             if e["event"] in ("killed", "restarted")]
        self.lines: list[tuple[float, str, dict[str, str]]] = []
        for entry in timeline["lines"]:
            m = re.match(r"E2E-R (\S+)(.*)", entry["line"])
            if m:
                kv = dict(re.findall(r"(\S+?)=(\S*)", m.group(2)))
                self.lines.append((entry["t"], m.group(1), kv))

    def result(self, phase: str, **match: str) -> dict[str, str]:
        for _, name, kv in self.lines:
            if name == phase and all(kv.get(k) == v for k, v in match.items()):
                return kv
        pytest.fail(f"the guest reported no '{phase}' {match or ''} line; see "
                    f"{self.dir / 'console.log'}")

    def when(self, phase: str, **match: str) -> float:
        for t, name, kv in self.lines:
            if name == phase and all(kv.get(k) == v for k, v in match.items()):
                return t
        pytest.fail(f"no '{phase}' line")

    def fio(self, name: str) -> dict[str, Any]:
        job: dict[str, Any] = json.loads((self.dir / name).read_text())["jobs"][0]
        return job

    def json(self, name: str) -> Any:
        return json.loads((self.dir / name).read_text())


@pytest.fixture(scope="module")
def run() -> Run:
    d = _results_dir()
    if d is None:
        pytest.skip("vhost-user e2e results not requested: set VMMIOD_VU_RESULTS=DIR (after "
                    "tests/e2e/vhost_user/run) or VMMIOD_VU_E2E=1 (see docs/e2e.md)")
    if not (d / "run.json").exists():
        pytest.fail(f"{d} holds no run.json: the harness did not get as far as the guest")
    return Run(d)


def test_guest_finished_its_workload(run: Run) -> None:
    assert run.info["status"] == "ok", run.info["status"]
    run.result("done")


def test_backend_under_test_is_vmmiod_when_it_has_the_adaptor(run: Run) -> None:
    if not (REPO / "vmmiod/hypervisors/vhost_user/__init__.py").exists():
        pytest.skip("vmmiod has no vhost-user adaptor in this checkout: the run checked the "
                    "harness against qemu-storage-daemon")
    assert run.info["dut"] == "vmmiod", run.info["dut_reason"]


def test_blk_fio_crc32c_write_and_verify(run: Run) -> None:
    kv = run.result("verify")
    assert kv == {"rc": "0", "error": "0"}, kv
    job = run.fio("fio-verify.json")
    blocks = run.params["VERIFY_MIB"] * 256  # 4 KiB each
    assert job["error"] == 0
    assert job["write"]["total_ios"] == blocks
    assert job["read"]["total_ios"] == blocks  # every block read back and its crc32c checked


def test_ext4_made_in_the_guest_checks_clean_on_the_host(run: Run, tmp_path: Path) -> None:
    assert run.result("ext4")["rc"] == "0"
    image = run.dir / "ext4.img"
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    sums = (run.dir / "ext4-sums.txt").read_text().splitlines()
    assert len(sums) == 4
    for line in sums:
        digest, name = line.split()
        dest = tmp_path / name.replace("/", "_")
        subprocess.run(["debugfs", "-R", f"dump /{name} {dest}", str(image)], capture_output=True,
                       timeout=60, check=True)
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest, name
    note = tmp_path / "dir_sub_note.txt"
    assert note.read_text() == f"vmmiod vhost-user e2e {run.params['TOKEN']}\n"


def _net(run: Run) -> None:
    if run.info["net"] != "on":
        pytest.skip(run.info["net"])


@pytest.mark.parametrize("size", ["56", "1400"])
def test_net_ping_host_tap(run: Run, size: str) -> None:
    _net(run)
    assert run.result("net")["mac"] == run.params["NET_MAC"]
    assert run.result("ping", size=size)["received"] == "5"


@pytest.mark.parametrize("direction", ["up", "down"])
def test_net_iperf3(run: Run, direction: str) -> None:
    _net(run)
    assert run.result("iperf", dir=direction)["rc"] == "0"
    data = run.json(f"iperf-{direction}.json")
    assert "error" not in data, data.get("error")
    received = data["end"]["sum_received"]
    assert received["bytes"] > 0
    print(f"iperf3 {direction}: {received['bits_per_second'] / 1e6:.0f} Mbit/s, "
          f"{received['bytes']} bytes, retransmits {data['end']['sum_sent'].get('retransmits')}")


def test_console_over_vhost_user(run: Run) -> None:
    console = run.info["console"]
    if console["status"] != "ok":
        pytest.skip(console["reason"])


def test_backend_sigkilled_during_fio_guest_continues(run: Run) -> None:
    """Killed once (qemu-storage-daemon), or 1 to 3 times (vmmiod: until a restarted instance
    redid requests; backends.Stack.kill_and_restart), and started again after each kill."""
    names = [e["event"] for e in run.events]
    kills = len(names) // 2
    assert 1 <= kills <= 3 and names == ["killed", "restarted"] * kills, run.events
    kv = run.result("kill")
    assert kv == {"fio_rc": "0", "error": "0"}, kv
    # fio was still running when the backend died and finished only after it came back.
    assert run.when("kill") > run.events[-1]["t"]
    job = run.fio("fio-kill.json")
    blocks = run.params["KILL_MIB"] * 256
    assert job["write"]["total_ios"] == blocks
    assert job["read"]["total_ios"] == blocks
    history = run.info["backends"]["dut"]["history"]
    assert len(history) == kills + 1, history
    for i in range(kills):
        killed, restarted = run.events[2 * i], run.events[2 * i + 1]
        assert history[i]["rc"] == -9 and history[i]["pid"] == killed["pid"]
        assert history[i + 1]["pid"] == restarted["pid"]
    # The last instance served to the end: it was stopped by the harness, not by a crash.
    assert history[-1]["how"] == "SIGTERM", history[-1]


def test_guest_kernel_log_has_no_io_error(run: Run) -> None:
    lines = (run.dir / "dmesg.txt").read_text(errors="replace").splitlines()
    stalls = [line for line in lines if "rcu: INFO:" in line]
    if stalls:
        print(f"{len(stalls)} RCU stall report(s) (emulated CPU starved by the host):", stalls)
    bad = [line for line in lines if DMESG_BAD.search(line)]
    assert not bad, bad


def test_backends_stop_cleanly(run: Run) -> None:
    for name, backend in run.info["backends"].items():
        last = backend["history"][-1]
        assert last.get("rc") == 0, (name, last)


def test_vmmiod_logged_no_problem(run: Run) -> None:
    if run.info["dut"] != "vmmiod":
        pytest.skip(f"the backend under test was {run.info['dut']} ({run.info['dut_reason']})")
    events = []
    for log in sorted(run.dir.glob("dut-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    seen = {e.get("event") for e in events}
    assert not (seen & BAD_EVENTS), sorted(seen & BAD_EVENTS)
    loud = [e for e in events if e.get("level") not in ("debug", "info")]
    assert not loud, loud[:5]
    assert events, "vmmiod logged nothing"


def _qemu_config_warnings(d: Path) -> list[str]:
    """QEMU's protocol-feature complaints about a back-end in its log (docs/vhost-user.md:
    QEMU 7.2 warns when a net back-end offers VHOST_USER_PROTOCOL_F_CONFIG)."""
    lines = (d / "qemu.log").read_text(errors="replace").splitlines()
    warnings = [line for line in lines if "warning:" in line]
    if warnings:
        print("QEMU's warnings:", warnings)
    return [line for line in lines if "VHOST_USER_PROTOCOL_F_CONFIG" in line]


def test_qemu_did_not_warn_about_the_protocol_features(run: Run) -> None:
    if run.info["dut"] != "vmmiod":
        pytest.skip(f"the backend under test was {run.info['dut']} ({run.info['dut_reason']})")
    assert not _qemu_config_warnings(run.dir)


def test_vmmiod_restarted_instance_resumed_every_ring(run: Run) -> None:
    """Each restarted instance got its rings back through the inflight record QEMU kept."""
    if run.info["dut"] != "vmmiod":
        pytest.skip(f"the backend under test was {run.info['dut']} ({run.info['dut_reason']})")
    for n in range(2, len(run.info["backends"]["dut"]["history"]) + 1):
        resumed = {e["device"]: e for e in _events(run.dir / f"dut-{n}.log")
                   if e.get("event") == "vhost_user_inflight_resumed"}
        assert {"ext4", "verify", "bench"} <= set(resumed), (n, sorted(resumed))
        print(f"instance {n} redid:", {d: e.get("resubmit") for d, e in resumed.items()})


def test_vmmiod_restarted_instance_redid_the_requests_in_flight(run: Run) -> None:
    """A kill landed while vmmiod held requests of the guest's fio (queue depth 32): the host
    saw them marked in the inflight record with vmmiod stopped, then killed it; the next
    instance redid them, and fio's crc32c verify of every block passed."""
    if run.info["dut"] != "vmmiod":
        pytest.skip(f"the backend under test was {run.info['dut']} ({run.info['dut_reason']})")
    kills = [(run.events[i], run.events[i + 1]) for i in range(0, len(run.events) - 1, 2)]
    for n, (killed, restarted) in enumerate(kills, 1):
        print(f"kill {n}: {killed.get('inflight_seen')} in flight (seen after "
              f"{killed.get('watched_seconds')} s), redone by the next instance: "
              f"{restarted.get('resubmit')}")
    killed, restarted = kills[-1]
    assert killed.get("inflight_seen"), killed
    assert restarted.get("resubmit"), restarted
    last = len(run.info["backends"]["dut"]["history"])
    resumed = [e for e in _events(run.dir / f"dut-{last}.log")
               if e.get("event") == "vhost_user_inflight_resumed" and e.get("device") == "verify"]
    assert resumed and resumed[0]["resubmit"] == restarted["resubmit"] > 0, resumed
    assert run.result("kill") == {"fio_rc": "0", "error": "0"}
    job = run.fio("fio-kill.json")
    assert job["read"]["total_ios"] == run.params["KILL_MIB"] * 256  # every block verified


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_side_by_side_figures(run: Run) -> None:
    figures = run.json("bench.json")
    for be in run.info["bench_backends"]:
        missing = [job for job, row in figures.items() if not row.get(be)]
        assert not missing, f"{be}: no figures for {missing}"
    sys.path.insert(0, str(HERE))
    import backends

    print("\n" + backends.bench_table(figures))
    if "vmmiod" not in run.info["bench_backends"]:
        pytest.skip(f"qemu-storage-daemon's figures only: {run.info['dut_reason']}")


def test_side_by_side_ran_with_the_vcpu_on_a_cpu_of_its_own(run: Run) -> None:
    """The block side by side keeps the guest's vCPU thread apart from QEMU's other threads and
    the storage backends (placement.py), and gives every thread its CPUs back afterwards; left
    out only where the harness says why (turned off, one CPU)."""
    place = run.info.get("placement") or {}
    if place.get("status") != "on":
        reason = str(place.get("reason"))
        if reason.startswith(("turned off", "one CPU")):
            pytest.skip(f"no CPU placement: {reason}")
        pytest.fail(f"the block side by side ran unplaced: {reason}")
    assert place["vcpu_threads"] >= 1 and set(place["vcpu_cpus"]).isdisjoint(place["other_cpus"])
    events = [e["event"] for e in run.json("timeline.json")["host_events"]]
    assert "placement" in events and "placement_over" in events, events


# -- the microvm pass (`run --machine microvm`, results in DIR/microvm): virtio-mmio ------------
@pytest.fixture(scope="module")
def microvm() -> Run:
    d = _results_dir()
    if d is None:
        pytest.skip("vhost-user e2e results not requested (see docs/e2e.md)")
    if not (d / "microvm" / "run.json").exists():
        pytest.skip(f"the microvm pass was not run: no {d / 'microvm' / 'run.json'} "
                    "(tests/e2e/vhost_user/run --machine microvm --results DIR/microvm)")
    return Run(d / "microvm")


def test_microvm_guest_finished(microvm: Run) -> None:
    assert microvm.info["status"] == "ok", (microvm.info["status"], microvm.info["attempts"])
    microvm.result("done")


def test_microvm_kernel_was_given_the_tsc_rate(microvm: Run) -> None:
    """microvm has no HPET or PM timer: a kernel left to calibrate its TSC against a PIT that a
    busy host disturbs stops at 0.000000 s (docs/e2e.md). Every boot got the measured rate."""
    appends = [a["kernel_append"] for a in microvm.info["attempts"]]
    assert appends and all(re.search(r"\btsc_early_khz=\d{6,8}\b", a) for a in appends), appends


def test_microvm_devices_are_virtio_mmio(microvm: Run) -> None:
    devices = {kv["id"]: kv["transport"] for _, name, kv in microvm.lines if name == "device"}
    want = {"0x0002": "virtio-mmio", "0x0009": "virtio-mmio"}  # block, 9p share
    if microvm.params["NET"] == 1:
        want["0x0001"] = "virtio-mmio"
    assert {k: devices.get(k) for k in want} == want, devices


def test_microvm_blk_fio_crc32c_write_and_verify(microvm: Run) -> None:
    kv = microvm.result("verify")
    assert kv == {"rc": "0", "error": "0"}, kv
    job = microvm.fio("fio-verify.json")
    blocks = microvm.params["VERIFY_MIB"] * 256  # 4 KiB each
    assert job["write"]["total_ios"] == blocks
    assert job["read"]["total_ios"] == blocks


def test_microvm_net_ping_host_tap(microvm: Run) -> None:
    if microvm.params["NET"] != 1:
        pytest.skip(f"net: {microvm.info['net']}")
    assert microvm.result("net")["mac"] == microvm.params["NET_MAC"]
    assert microvm.result("ping", size="56")["received"] == "5"


def test_microvm_qemu_did_not_warn_about_the_protocol_features(microvm: Run) -> None:
    assert not _qemu_config_warnings(microvm.dir)


def test_microvm_vmmiod_served_and_logged_no_problem(microvm: Run) -> None:
    events = []
    for line in (microvm.dir / "dut-1.log").read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    seen = {e.get("event") for e in events}
    assert not (seen & BAD_EVENTS), sorted(seen & BAD_EVENTS)
    loud = [e for e in events if e.get("level") not in ("debug", "info")]
    assert not loud, loud[:5]
    blk = [e for e in events if e.get("event") == "block_closed" and e.get("device") == "verify"]
    assert blk and blk[-1]["requests_out"] >= microvm.params["VERIFY_MIB"] * 256, blk
    if microvm.params["NET"] == 1:
        net = [e for e in events if e.get("event") == "net_device_closed"]
        assert net and net[-1]["tx_frames"] >= 5 and net[-1]["rx_frames"] >= 5, net
    assert microvm.info["backends"]["dut"]["history"][-1].get("rc") == 0


# -- the net side by side: dpdk-testpmd's mirror and vmmiod's, same guest, same traffic ---------
MIRRORS = ["testpmd", "vmmiod"]


def _mirror(run: Run) -> None:
    m = run.info.get("net_mirror") or {"status": "skipped",
                                       "reason": "the run has no net side by side"}
    if m["status"] != "on":
        pytest.skip(f"net side by side: {m['reason']}")


def _mirror_lines(run: Run, kind: str, be: str) -> list[dict[str, str]]:
    return [kv for _, name, kv in run.lines if name == kind and kv.get("be") == be]


@pytest.mark.parametrize("be", MIRRORS)
def test_net_mirror_nic_is_set_up(run: Run, be: str) -> None:
    _mirror(run)
    setup = _mirror_lines(run, "mirror-setup", be)
    assert setup and setup[0]["rc"] == "0", setup
    assert setup[0]["mac"] == run.params[f"MIRROR_MAC_{be.upper()}"]


@pytest.mark.parametrize("size", ["56", "1400"])
@pytest.mark.parametrize("be", MIRRORS)
def test_net_mirror_pings(run: Run, be: str, size: str) -> None:
    """Every ping of every round came back through the back-end's mirror (netmirror.py: the
    echo request is mirrored, the guest answers it, the answer is mirrored back)."""
    _mirror(run)
    pings = [kv for kv in _mirror_lines(run, "mirror", be) if kv.get("size") == size]
    assert len(pings) == run.params["BENCH_ROUNDS"], pings
    for kv in pings:
        assert kv["sent"] == str(run.params["MIRROR_PINGS"]) and kv["received"] == kv["sent"], kv
    print(f"{be}, {size} bytes: RTT min/avg/max per round (ms):", [kv["rtt"] for kv in pings])


def test_net_mirror_frames_per_second_for_both(run: Run) -> None:
    _mirror(run)
    figures = run.json("net-bench.json")
    for be in MIRRORS:
        burst, cpu = figures[be]["burst"], figures[be]["cpu"]
        assert burst["rounds"] == run.params["BENCH_ROUNDS"], (be, burst)
        assert burst["frames_per_second"] and burst["frames_back"] > 0, (be, burst)
        assert cpu["cpu_us_per_frame"] is not None, (be, cpu)
    assert figures["ratios"]["frames_per_second"] is not None
    sys.path.insert(0, str(HERE))
    import netmirror

    print("\n" + netmirror.net_table(figures))


def test_net_mirror_each_backend_got_exactly_the_guests_frames(run: Run) -> None:
    """The same traffic against both: testpmd's own count of the frames it received (its forward
    statistics at exit) and vmmiod's peer's count are the guest's transmitted frames in that
    back-end's rounds (the NICs send nothing else: no IPv6, a static ARP entry)."""
    _mirror(run)
    sent = {be: sum(int(kv["tx"]) for kv in _mirror_lines(run, "mirror-round", be))
            for be in MIRRORS}
    stats = re.findall(r"RX-packets: (\d+)", (run.dir / "testpmd.log").read_text())
    assert stats, "testpmd printed no forward statistics (it did not exit through its stdin)"
    peer = [json.loads(line) for line in (run.dir / "mirror-peer.log").read_text().splitlines()
            if line.startswith("{")]
    print(f"guest sent {sent}; testpmd received {stats[-1]}; vmmiod's peer {peer[-1]['frames']}")
    assert int(stats[-1]) == sent["testpmd"]
    assert peer[-1]["frames"] == sent["vmmiod"] and peer[-1]["dropped"] == 0
