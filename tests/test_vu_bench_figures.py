"""The vhost-user stage's side-by-side figures (tests/e2e/vhost_user/backends.py), from files
written here: every job runs in rounds, the backends taking turns, and the figures add the
rounds up (no guest, no QEMU needed)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "e2e" / "vhost_user"
sys.path.insert(0, str(HERE))

import backends
import guestvm

CLK = 100


def _fio(results: Path, be: str, job: str, rnd: int, ios: int, runtime_ms: int,
         write: bool = False) -> None:
    side = {"total_ios": ios, "iops": ios * 1000 / runtime_ms}
    empty = {"total_ios": 0, "iops": 0.0}
    job_json = {"jobname": job, "error": 0, "job_runtime": runtime_ms,
                "read": empty if write else side, "write": side if write else empty}
    (results / f"bench-{be}-{job}-r{rnd}.json").write_text(json.dumps({"jobs": [job_json]}))


def _sample(samples: dict[str, Any], be: str, job: str, rnd: int, ticks: int) -> None:
    samples[f"{be}/{job}/{rnd}"] = {"pid": 1, "start": 1000, "end": 1000 + ticks,
                                    "t_start": 10.0 * rnd, "t_end": 10.0 * rnd + 1.0}


def test_rounds_are_added_up_and_compared_round_by_round(tmp_path: Path) -> None:
    samples: dict[str, Any] = {}
    # qemu-storage-daemon: 3,000 then 2,000 IOPS; vmmiod 2,700 then 2,000 (the host got busier
    # in round 2, for both).
    for rnd, (q_ios, v_ios) in enumerate([(3000, 2700), (2000, 2000)], start=1):
        _fio(tmp_path, "qsd", "randwrite-qd1", rnd, q_ios, 1000, write=True)
        _fio(tmp_path, "vmmiod", "randwrite-qd1", rnd, v_ios, 1000, write=True)
        _sample(samples, "qsd", "randwrite-qd1", rnd, 15)
        _sample(samples, "vmmiod", "randwrite-qd1", rnd, 30)
    (tmp_path / "cpu.json").write_text(json.dumps({"clk_tck": CLK, "samples": samples}))

    row = backends.bench_figures(tmp_path, ["qsd", "vmmiod"])["randwrite-qd1"]
    assert row["qsd"]["ios"] == 5000 and row["qsd"]["iops"] == 2500
    assert row["vmmiod"]["ios"] == 4700 and row["vmmiod"]["iops"] == 2350
    assert row["qsd"]["rounds"] == 2 and row["vmmiod"]["round_iops"] == [2700, 2000]
    assert row["iops_ratio"] == round(2350 / 2500, 3)
    assert row["round_ratios"] == [0.9, 1.0]
    # CPU: 0.3 s and 0.6 s over 5,000 and 4,700 requests.
    assert row["qsd"]["cpu_us_per_request"] == 60.0
    assert row["vmmiod"]["cpu_us_per_request"] == round(0.6e6 / 4700, 1)
    assert row["qsd"]["wall_seconds"] == 2.0
    table = backends.bench_table({"randwrite-qd1": row})
    assert "0.90 1.00" in table


def test_a_missing_or_failed_round_leaves_the_backend_without_figures(tmp_path: Path) -> None:
    samples: dict[str, Any] = {}
    for rnd in (1, 2):
        _fio(tmp_path, "qsd", "randread-qd1", rnd, 3000, 1000)
        _sample(samples, "qsd", "randread-qd1", rnd, 15)
        _sample(samples, "vmmiod", "randread-qd1", rnd, 30)
    _fio(tmp_path, "vmmiod", "randread-qd1", 1, 2800, 1000)  # round 2's output is missing
    (tmp_path / "cpu.json").write_text(json.dumps({"clk_tck": CLK, "samples": samples}))
    row = backends.bench_figures(tmp_path, ["qsd", "vmmiod"])["randread-qd1"]
    assert row["qsd"]["iops"] == 3000
    assert row["vmmiod"] is None
    assert "iops_ratio" not in row and "round_ratios" not in row


class _Stack:
    def __init__(self) -> None:
        self.marks: list[tuple[str, str, str, int]] = []

    def bench_mark(self, edge: str, job: str, be: str, rnd: int) -> None:
        self.marks.append((edge, job, be, rnd))


def test_the_guests_bench_lines_reach_the_cpu_sampler_with_their_round() -> None:
    """guest.sh's `E2E-B` lines, as the script writes them, are the ones the host parses."""
    script = (HERE / "guest.sh").read_text()
    echoes = re.findall(r'echo "(E2E-B (?:start|end) [^"]*)"', script)
    assert len(echoes) == 2, echoes
    g = object.__new__(guestvm.Guest)
    g.lines, g.stack = [], _Stack()  # type: ignore[assignment]
    for text in echoes:
        line = text.replace("$name", "randwrite-qd1").replace("$be", "vmmiod") \
            .replace("$rnd", "3")
        assert "$" not in line, line
        g._on_line(line, 1.0)
    assert g.stack.marks == [("start", "randwrite-qd1", "vmmiod", 3),  # type: ignore[attr-defined]
                             ("end", "randwrite-qd1", "vmmiod", 3)]
