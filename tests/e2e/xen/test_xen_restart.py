"""Real Xen: vmmiod killed or restarted under a running Linux domU, which sees only a pause
(issue 17, docs/restart.md). tests/e2e/xen/run --mode restart boots it (dom0-restart.sh,
domU-restart.sh); these tests read the run's result files:
- VMMIOD_E2E_RESTART_RESULTS=DIR: check the results in DIR;
- VMMIOD_E2E=1: run the harness first (`run --mode restart`, minutes), then check.
Otherwise they are skipped. Each test prints the guest's pause, measured on its own clock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.xen.runresults import guest_lines, open_run

pytestmark = pytest.mark.e2e
BAD_EVENTS = {"guest_protocol_violation", "device_needs_reset", "state_record_refused",
              "state_record_unavailable", "xen_server_reattach_failed", "startup_failed",
              "stop_timeout", "stop_step_failed"}


class RestartRun:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.params: dict[str, Any] = json.loads((d / "params.json").read_text())
        self.guest, self.kernel = guest_lines(d / "guest-e2e.log")
        results = d / "dom0-results.txt"
        self.dom0 = results.read_text().splitlines() if results.exists() else []

    def find(self, what: str, has: str = "", **match: str) -> dict[str, str]:
        """The guest's last `what` line with key `has` and the values in `match`."""
        hits = [kv for w, kv in self.guest if w == what and (not has or has in kv)
                and all(kv.get(k) == v for k, v in match.items())]
        assert hits, f"the guest reported no '{what}' {match}; see {self.dir / 'guest-e2e.log'}"
        return hits[-1]

    def restart(self, phase: str) -> dict[str, str]:
        for line in self.dom0:
            if line.startswith(f"restart phase={phase} "):
                return dict(w.split("=", 1) for w in line.split() if "=" in w)
        raise AssertionError(f"dom0 recorded no restart for phase {phase}: {self.dom0}")

    def instance(self, n: int) -> list[dict[str, Any]]:
        path = self.dir / f"vmmiod-restart-{n}.log"
        assert path.exists(), f"no log of vmmiod instance {n}"
        return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


@pytest.fixture(scope="module")
def run() -> RestartRun:
    return open_run(RestartRun, "restart", "VMMIOD_E2E_RESTART_RESULTS", "results-restart",
                    "--mode", "restart")


def _io_phase(run: RestartRun, phase: str) -> None:
    done = run.find("restart_io", has="write_rc", phase=phase)
    restart = run.restart(phase)
    print(f"\nphase {phase} ({'SIGTERM' if restart['signal'] == 'TERM' else 'kill -9'} mid-I/O): "
          f"guest pause {float(done['pause_seconds']):.1f} s (longest 1 MiB write), next "
          f"instance serving {restart['ready_seconds']} s after its start, "
          f"{restart['stop_to_ready_seconds']} s after the stop (TCG)")
    assert done["write_rc"] == "0"
    assert done["written"] == done["read"], "the pattern read back differs from what was written"


def test_kill9_during_io_guest_completes_and_verifies(run: RestartRun) -> None:
    _io_phase(run, "A")


def test_kill9_idle_then_disk_console_net_work(run: RestartRun) -> None:
    disk = run.find("restart_idle", has="write_rc", phase="B")
    net = run.find("restart_idle", has="received", phase="B")
    restart = run.restart("B")
    print(f"\nphase B (kill -9 idle): guest pause {float(disk['pause_seconds']):.1f} s (its first "
          f"disk access after the kill); next instance serving {restart['ready_seconds']} s "
          "after its start (TCG)")
    assert disk["write_rc"] == "0" and disk["read_ok"] == "1"
    for tag in ("p0-afterB", "named-afterB"):
        console = run.find("console", tag=tag)
        assert console["present"] == "1" and console["reply_ok"] == "1", console
    assert net["rc"] == "0" and int(net["received"] or 0) >= 1, net


def test_sigterm_mid_io_same(run: RestartRun) -> None:
    _io_phase(run, "C")
    assert run.restart("C")["exit"] == "0"  # the orderly stop for a restart


def test_guest_kernel_logged_no_virtio_error_or_soft_lockup(run: RestartRun) -> None:
    k = run.find("restart_kernel")
    assert (k["softlockup"], k["hung"], k["virtio"], k["io_error"]) == ("0", "0", "0", "0"), \
        run.kernel
    run.find("restart")  # "restart done": the guest got to the end


def test_every_instance_ran_under_mdwe(run: RestartRun) -> None:
    """Each instance ran as the template unit runs it: MemoryDenyWriteExecute=yes, which
    Debian 12's systemd applies as a seccomp filter (Seccomp: 2)."""
    lines = [dict(w.split("=", 1) for w in x.split()[1:]) for x in run.dom0
             if x.startswith("instance ")]
    assert [x["n"] for x in lines] == ["1", "2", "3", "4"], run.dom0
    assert all(x["seccomp"] == "2" for x in lines), lines


def test_every_instance_took_the_server_and_devices_over(run: RestartRun) -> None:
    for n in (2, 3, 4):
        events = run.instance(n)
        names = {e.get("event") for e in events}
        assert "xen_ioreq_server_reattached" in names, f"instance {n}"
        assert "state_resumed" in names, f"instance {n}"
        assert "xen_ioreq_server_created" not in names, f"instance {n} created a new server"
        bad = [e for e in events if e.get("event") in BAD_EVENTS or e.get("level") == "error"]
        assert not bad, bad[:3]
