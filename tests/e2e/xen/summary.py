#!/usr/bin/env python3
"""Print a real-Xen e2e run's figures (what .ci/e2e shows after the checks).

  tests/e2e/xen/summary.py RESULTS_DIR

One line per xl step of dom0-full.sh (status and seconds), and for each instance the dom0
service forked: the time from the service's fork to the instance's InitWait (libxl waits 10 s
for it) and the instance's exit status; then the network figures (netperf_report.py). Figures
from one run, for reading, not asserting.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path


def _time(record: dict[str, object]) -> float:
    return datetime.fromisoformat(str(record["timestamp"])).timestamp()  # 3.11 reads Z


def main(results: Path) -> int:
    steps = results / "dom0-results.txt"
    if not steps.exists():
        print(f"e2e summary: no {steps}")
        return 0
    print("e2e summary (one run; seconds as dom0 measured them under QEMU's TCG):")
    for line in steps.read_text().splitlines():
        if line.startswith(("step ", "service_", "vmmiod_")):
            print(f"  {line}")
    log = results / "dom0-service.log"
    records = []
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    for started in (r for r in records if r.get("event") == "dom0_guest_started"):
        key = (started.get("guest"), started.get("domid"))
        initwait = [r for r in records if r.get("event") == "xen_backend_state"
                    and r.get("state") == 2 and (r.get("guest"), r.get("domid")) == key]
        ended = [r for r in records if r.get("event") in ("dom0_guest_exited", "dom0_guest_failed")
                 and (r.get("guest"), r.get("domid")) == key]
        wait = f"{_time(initwait[0]) - _time(started):.2f} s" if initwait else "never"
        status = ended[0].get("exit_code") if ended else "running"
        print(f"  instance {key[0]} domid {key[1]}: fork -> first InitWait {wait} (the fork comes "
              f"at the domain's introduction, before libxl writes entries), exit {status}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import netperf_report  # the network figures (domU-netperf.sh, issue 14)

    netperf_report.report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
