"""Assertions on a real-Xen end-to-end run: Linux's own virtio drivers in a Xen domU against
vmmiod in dom0 (tests/e2e/xen/run boots it; see docs/e2e.md).

These tests read the run's result files; they never boot anything themselves unless asked:
- VMMIOD_E2E_RESULTS=DIR: check the results in DIR (what .ci/e2e does after `run`);
- VMMIOD_E2E=1: run the harness first (build + boot, minutes), then check.
Otherwise they are skipped, so the unit-test stage stays fast.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.xen.runresults import guest_lines, open_run

pytestmark = pytest.mark.e2e
MiB = 1 << 20
SECTOR = 512
VIRTIO_ID_NET, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE = 1, 2, 3
# ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK: the driver accepted the device.
STATUS_LIVE = 0x1 | 0x2 | 0x8 | 0x4
LIBXL_DESTROY_TIMEOUT = 10  # seconds libxl waits for a backend's Closed (libxl_internal.h)
DESTROY_BOUND_S = 3  # issue 14: `xl destroy` takes under 3 s
# Windows in the order the guest config declares its disks (xvda..xvdd) and what vmmiod serves.
WINDOWS = {"2000000.virtio": (VIRTIO_ID_BLOCK, "virtio_blk"),
           "2000200.virtio": (VIRTIO_ID_BLOCK, "virtio_blk"),
           "2000400.virtio": (VIRTIO_ID_NET, "virtio_net"),
           "2000600.virtio": (VIRTIO_ID_CONSOLE, "virtio_console")}
# Every instance: start-up, the IOREQ server, each driver's negotiation, the domain's end, stop.
EXPECTED_EVENTS = {"daemon_starting", "xen_domain_resolved", "xen_ioreq_server_enabled",
                   "xen_serving", "daemon_ready", "features_negotiated", "queue_ready",
                   "device_activated", "xen_domain_gone", "guest_finished", "daemon_stopped"}
# The first instance also saw the guest unbind and rebind every window.
EXPECTED_EXTRA = {1: {"device_reset"}, 2: set(), 3: set()}
BAD_EVENTS = {"guest_protocol_violation", "device_needs_reset", "ioreq_unhandled",
              "stop_timeout", "stop_step_failed", "startup_failed"}


class Run:
    """One run's result files, parsed."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.params: dict[str, Any] = json.loads((d / "params.json").read_text())
        self.dom0 = self._kv_lines(d / "dom0-results.txt")
        self.peer = self._kv_lines(d / "peer.txt")
        self.guest = guest_lines(d / "guest-e2e.log")[0]

    @staticmethod
    def _kv_lines(path: Path) -> list[dict[str, str]]:
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            words = line.split()
            if words:
                out.append({"_": words[0].split("=")[0], **dict(w.split("=", 1) for w in words
                                                               if "=" in w)})
        return out

    def vmmiod_records(self, name: str) -> list[dict[str, Any]]:
        path = self.dir / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()
                if line.startswith("{")]

    def service_records(self) -> list[dict[str, Any]]:
        """Every JSON line of the dom0 service and of the instances it forked."""
        return self.vmmiod_records("dom0-service.log")

    def service_events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.service_records() if r.get("event") == event
                and all(r.get(k) == v for k, v in match.items())]

    def instance(self, guest: str, domid: int) -> list[dict[str, Any]]:
        """The records of one instance: its guest name and domid (the daemon binds both)."""
        return [r for r in self.service_records() if r.get("service") != "dom0"
                and r.get("guest") == guest and r.get("domid") == domid]

    def step(self, name: str) -> dict[str, str]:
        hits = [r for r in self.dom0 if r["_"] == "step" and r.get("name") == name]
        assert hits, f"dom0 did not run step {name!r}; see {self.dir / 'dom0-results.txt'}"
        return hits[-1]

    def domid(self, name: str, boot: int | None = None) -> int:
        hits = [r for r in self.dom0 if r["_"] == "domid" and r.get("name") == name
                and (boot is None or r.get("boot") == str(boot))]
        assert hits and hits[-1].get("domid", "").isdigit(), f"no domid for {name} boot {boot}"
        return int(hits[-1]["domid"])

    def dom0_value(self, key: str) -> str | None:
        for rec in self.dom0:
            if key in rec:
                return rec[key]
        return None

    def boots(self) -> dict[int, list[tuple[str, dict[str, str]]]]:
        """Guest findings grouped by boot number."""
        out: dict[int, list[tuple[str, dict[str, str]]]] = {}
        current = 0
        for what, kv in self.guest:
            if what == "boot" and "n" in kv and "done" not in kv:
                current = int(kv["n"])
            if current:
                out.setdefault(current, []).append((what, kv))
        return out

    def find(self, boot: int, what: str, **match: str) -> list[dict[str, str]]:
        return [kv for w, kv in self.boots().get(boot, []) if w == what
                and all(kv.get(k) == v for k, v in match.items())]

    def one(self, boot: int, what: str, **match: str) -> dict[str, str]:
        hits = self.find(boot, what, **match)
        assert hits, f"boot {boot}: the guest reported no '{what}' {match or ''}; see " \
                     f"{self.dir / 'guest-e2e.log'}"
        return hits[-1]


@pytest.fixture(scope="module")
def run() -> Run:
    return open_run(Run, "full", "VMMIOD_E2E_RESULTS", "results")


def test_run_completed(run: Run) -> None:
    status = (run.dir / "dom0-status").read_text().strip() if (run.dir / "dom0-status").exists() \
        else "missing (dom0 did not finish)"
    assert status == "ok", f"dom0 status: {status}"


def test_hypervisor_has_ioreq_server(run: Run) -> None:
    assert run.dom0_value("hyp_ioreq_server") == "y", "xenhypfs /buildinfo/config: no IOREQ server"


@pytest.mark.parametrize("boot", [1, 2, 3])
def test_linux_drivers_bound_every_window(run: Run, boot: int) -> None:
    devices = {kv["window"]: kv for kv in run.find(boot, "virtio")}
    for window, (device_id, driver) in WINDOWS.items():
        assert window in devices, f"boot {boot}: no virtio device on {window}: {devices}"
        dev = devices[window]
        assert int(dev["device"], 16) == device_id
        assert int(dev["vendor"], 16) != 0
        assert dev["driver"] == driver
        assert int(dev["status"], 16) & STATUS_LIVE == STATUS_LIVE, f"{window} status {dev['status']}"


def test_block_capacity_and_readonly_flag(run: Run) -> None:
    size = run.one(1, "blk_size")
    assert int(size["vda_sectors"]) * SECTOR == run.params["DISK_RW_MIB"] * MiB
    assert int(size["vdb_sectors"]) * SECTOR == run.params["DISK_RO_MIB"] * MiB
    assert size["vda_ro"] == "0"
    assert size["vdb_ro"] == "1"


@pytest.mark.parametrize("boot", [1, 2])
def test_block_pattern_round_trip(run: Run, boot: int) -> None:
    pat = run.one(boot, "blk_pattern", label=f"boot{boot}")
    assert pat["write_rc"] == "0"
    assert re.fullmatch(r"[0-9a-f]{64}", pat["written"])
    assert pat["read"] == pat["written"]


def test_filesystem_checked_on_the_host(run: Run) -> None:
    fs = run.one(1, "fs")
    assert fs["mkfs_rc"] == fs["mount_rc"] == fs["umount_rc"] == "0"
    image = run.dir / "disk-rw.img"
    fsck = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
    res = subprocess.run([fsck, "-f", "-n", str(image)], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr

    def cat(path: str) -> bytes:
        out = subprocess.run([shutil.which("debugfs") or "/usr/sbin/debugfs", "-R",
                              f"cat {path}", str(image)], capture_output=True, check=False)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert cat("/hello.txt").decode() == f"hello from the e2e guest {run.params['TOKEN']}\n"
    assert hashlib.sha256(cat("/hello.txt")).hexdigest() == fs["hello_sha256"]
    assert hashlib.sha256(cat("/dir/data.bin")).hexdigest() == fs["data_sha256"]
    assert cat("/dir/numbers.txt").decode().split() == [str(i) for i in range(1, 20001)]
    # Written by the second boot, after the reboot.
    assert cat("/boot-count").decode().strip() == "2"
    assert cat("/boot2.txt").decode() == f"second boot {run.params['TOKEN']}\n"


def test_filesystem_survives_reboot(run: Run) -> None:
    first = run.one(1, "fs")
    again = run.one(2, "fs_again")
    assert again["mount_rc"] == again["umount_rc"] == "0"
    assert again["data_sha256"] == first["data_sha256"]
    assert again["hello_ok"] == "1"


def test_readonly_device_refuses_writes(run: Run) -> None:
    ro = run.one(1, "blk_ro")
    assert ro["read_sha256"] == run.params["DISK_RO_SHA256"]
    assert ro["write_rc"] != "0"
    assert ro["setrw_write_rc"] != "0", "the disk's read-only state did not come from the device"
    data = (run.dir / "disk-ro.img").read_bytes()
    assert hashlib.sha256(data).hexdigest() == run.params["DISK_RO_SHA256"]
    # Nothing was written through the read-only device (its final counters).
    final = [r for r in run.instance("e2e", run.domid("e2e", 1))
             if r.get("event") == "device_stats" and r.get("device") == "disk1" and r.get("final")]
    assert final and final[-1]["bytes_written"] == 0 and final[-1]["bytes_read"] > 0, final


@pytest.mark.parametrize("label", ["boot1", "reprobe", "boot2"])
def test_net_mac_ping_and_transfers(run: Run, label: str) -> None:
    boot = 2 if label == "boot2" else 1
    size = run.params["NET_BYTES"] // (1 if label == "boot1" else 8)
    nif = run.one(boot, "net_if", label=label)
    assert nif["mac"] == run.params["NET_MAC"]
    ping = run.one(boot, "net_ping", label=label)
    assert ping["rc"] == "0" and int(ping["received"] or 0) >= 1, ping
    up = run.one(boot, "net_up", label=label)
    assert up["rc"] == "0" and int(up["bytes"]) == size
    received = [p for p in run.peer if p["_"] == "net_up" and p.get("sha256") == up["sha256"]]
    assert received and int(received[0]["bytes"]) == size, \
        f"dom0 did not receive the guest's upload intact: {run.peer}"
    down = run.one(boot, "net_down", label=label)
    assert down["rc"] == "0" and int(down["bytes"]) == size
    sent = (run.dir / "net-down.bin").read_bytes()[:size]
    assert down["sha256"] == hashlib.sha256(sent).hexdigest()


@pytest.mark.parametrize("tag", ["p0", "named"])
@pytest.mark.parametrize("boot", [1, 2])
def test_console_carries_text_both_ways(run: Run, tag: str, boot: int) -> None:
    con = run.one(boot, "console", tag=f"{tag}-boot{boot}")
    assert con["present"] == "1", con
    assert con["reply_ok"] == "1", f"{con}; dom0 peer: {run.peer}"
    port = "console" if tag == "p0" else run.params["CONSOLE_PORT"]
    assert any(p["_"] == "console_ping" and p.get("port") == port
               and p.get("tag") == f"{tag}-boot{boot}" for p in run.peer)


# What Linux's virtio core and drivers print when a device breaks the protocol (vring_bad,
# virtio_break_device) and what follows for the net driver's queues.
GUEST_VIRTIO_ERRORS = re.compile(r"is not a head|out of range|used len|Unexpected TXQ|"
                                 r"virtio.*(?:broken|error|fail)|NETDEV WATCHDOG|blk_update_request")


def test_guest_kernel_saw_no_virtio_errors(run: Run) -> None:
    text = (run.dir / "guest-e2e.log").read_text(errors="replace")
    errors = [line for line in text.splitlines()
              if "E2E-R" not in line and GUEST_VIRTIO_ERRORS.search(line)]
    assert not errors, "\n".join(errors[:10])


def test_reset_and_reprobe_without_reboot(run: Run) -> None:
    rp = run.one(1, "reprobe")
    assert int(rp["windows"]) == len(WINDOWS)
    assert rp["devices_after_unbind"] == "0"
    assert int(rp["devices_after_bind"]) == len(WINDOWS)
    pattern = run.one(1, "blk_pattern", label="boot1")
    assert run.one(1, "blk_after_reprobe")["sha256"] == pattern["written"]


# -- the dom0 service and the toolstack's lifecycle, step by step (dom0-full.sh) -------------------
XL_ERRORS = re.compile(r"error|unable|fail", re.IGNORECASE)


def _xl_clean(run: Run, step: str) -> None:
    text = (run.dir / f"xl-{step}.log").read_text(errors="replace")
    assert not XL_ERRORS.search(text), f"xl {step} reported: {text}"


def test_service_started_as_the_unit_starts_it(run: Run) -> None:
    assert run.dom0_value("service_started") == "1"
    # Under MemoryDenyWriteExecute=yes (systemd 252's seccomp filter), like the unit.
    started = [r for r in run.dom0 if "service_started" in r]
    assert started and started[0].get("seccomp") == "2", started
    started = run.service_events("dom0_started")
    assert len(started) == 1 and started[0]["backend_domid"] == 0


def test_create_without_pause(run: Run) -> None:
    step = run.step("create_e2e")
    assert step["rc"] == "0", step
    _xl_clean(run, "create_e2e")
    domid = run.domid("e2e", 1)
    assert run.service_events("dom0_guest_started", guest="e2e", domid=domid)
    # InitWait came from the instance the service forked for this domain.
    states = [r for r in run.instance("e2e", domid) if r.get("event") == "xen_backend_state"
              and r.get("state") == 2]
    assert len(states) == len(WINDOWS), states


def test_two_guests_at_once(run: Run) -> None:
    step = run.step("create_web2")
    assert step["rc"] == "0", step
    _xl_clean(run, "create_web2")
    text = (run.dir / "guest-web2.log").read_text(errors="replace")
    found = {}
    for line in text.splitlines():
        m = re.search(r"E2E-R (\S+)(.*)", line)
        if m:
            found.setdefault(m.group(1), []).append(dict(re.findall(r"(\S+?)=(\S*)", m.group(2))))
    windows = {kv["window"]: kv for kv in found.get("virtio", [])}
    for window in ("2000000.virtio", "2000200.virtio"):  # web2's explicit windows
        assert windows.get(window, {}).get("driver") == "virtio_blk", windows
        assert int(windows[window]["status"], 16) & STATUS_LIVE == STATUS_LIVE
    blk = found["light_blk"][-1]
    assert blk["ro_sha256"] == run.params["DISK_RO_SHA256"]
    assert blk["written"] == blk["read"]
    # Both guests were served at the same time, each by its own instance.
    web2 = run.domid("web2")
    e2e = run.domid("e2e", 1)
    pids = {r["pid"] for r in run.service_events("dom0_guest_started") if r["domid"] in (web2, e2e)}
    assert len(pids) == 2


def test_guest_reboot(run: Run) -> None:
    assert run.find(1, "reboot-requested")
    assert run.step("guest_reboot")["rc"] == "0"
    first, second = run.domid("e2e", 1), run.domid("e2e", 2)
    assert second != first
    assert run.service_events("dom0_guest_exited", domid=first)[0]["exit_code"] == 0
    assert run.service_events("dom0_guest_started", guest="e2e", domid=second)
    assert run.dom0_value("boot2_finished") == "1"


def test_xl_reboot(run: Run) -> None:
    assert run.step("xl_reboot")["rc"] == "0"
    _xl_clean(run, "xl_reboot")
    second, third = run.domid("e2e", 2), run.domid("e2e", 3)
    assert third != second
    assert run.service_events("dom0_guest_exited", domid=second)[0]["exit_code"] == 0
    assert run.one(3, "fs_boot3")["hello_ok"] == "1"


def test_xl_shutdown(run: Run) -> None:
    assert run.step("xl_shutdown")["rc"] == "0"
    _xl_clean(run, "xl_shutdown")
    assert "E2E-R signal name=USR2 action=poweroff" in \
        (run.dir / "guest-web2.log").read_text(errors="replace")
    exited = run.service_events("dom0_guest_exited", domid=run.domid("web2"))
    assert exited and exited[0]["exit_code"] == 0


def test_xl_destroy(run: Run) -> None:
    step = run.step("xl_destroy")
    assert step["rc"] == "0"
    _xl_clean(run, "xl_destroy")
    # The product's part (docs/xen.md): every window's Closing (5) is answered with Closed (6)
    # by the serving instance while libxl waits, before the domain is gone (not by stop()).
    domid = run.domid("e2e", 3)
    records = run.instance("e2e", domid)
    events = [r.get("event") for r in records]
    assert "xen_domain_gone" in events, events
    before_gone = records[:events.index("xen_domain_gone")]
    closed = {r["path"] for r in before_gone
              if r.get("event") == "xen_backend_state" and r.get("state") == 6}
    assert len(closed) == len(WINDOWS), closed
    # Without those answers libxl would wait out LIBXL_DESTROY_TIMEOUT (10 s) for the devices.
    # Issue 14 asks for the whole `xl destroy` under 3 s: measured 2.2-2.3 s under TCG, quiet
    # or at load 4-10 (xl's own start and the domain's teardown are most of it, docs/e2e.md).
    assert float(step["seconds"]) < DESTROY_BOUND_S, step
    exited = run.service_events("dom0_guest_exited", domid=domid)
    assert exited and exited[0]["exit_code"] == 0


def test_libxl_reports_no_device_error(run: Run) -> None:
    xl_log = run.dir / "xl-e2e.log"
    if xl_log.exists():
        text = xl_log.read_text(errors="replace")
        assert "unable to add device" not in text and "unable to remove device" not in text


def test_guest_without_yaml_is_left_alone(run: Run) -> None:
    step = run.step("create_stranger")
    assert step["rc"] != "0", "nobody serves that guest, so xl cannot have succeeded"
    lines = run.service_events("dom0_guest_unconfigured", guest="stranger")
    assert len(lines) == 1 and lines[0]["config"] == "/etc/vmmiod/stranger.yaml"
    assert not run.service_events("dom0_guest_started", guest="stranger")


def test_mismatched_yaml_fails_that_guest_only(run: Run) -> None:
    step = run.step("create_bad")
    assert step["rc"] != "0"
    failed = run.service_events("dom0_guest_failed", guest="bad")
    assert len(failed) == 1 and failed[0]["exit_code"] == 78, failed
    why = [r for r in run.service_records() if r.get("guest") == "bad"
           and r.get("event") == "startup_failed"]
    assert why and "irq 33" in why[0]["message"], why
    assert run.dom0_value("service_alive") == "1"


def test_service_stops_cleanly(run: Run) -> None:
    assert run.dom0_value("service_exit") == "0"
    assert run.service_events("dom0_stopped")
    assert not run.service_events("dom0_guest_restarting")


@pytest.mark.parametrize("boot", [1, 2, 3])
def test_instance_json_log(run: Run, boot: int) -> None:
    path = run.dir / "dom0-service.log"
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError:
                pytest.fail(f"dom0-service.log:{n} is not a JSON line: {line[:200]}")
    records = run.instance("e2e", run.domid("e2e", boot))
    events = {r.get("event") for r in records}
    expected = EXPECTED_EVENTS | EXPECTED_EXTRA[boot]
    assert expected <= events, f"missing events: {expected - events}"
    errors = [r for r in records if r.get("level") in ("error", "critical")]
    assert not errors, errors[:5]
    bad = [r for r in records if r.get("event") in BAD_EVENTS]
    assert not bad, bad[:5]
    warnings = [r for r in records if r.get("event") == "xen_backend_entry_invalid"
                and r.get("level") == "warning"]
    assert not warnings, warnings[:3]
