"""The QD1 vhost-user benchmark (vmmiod/bench/vhost.py) runs end to end: a front-end of its own
against `vmmiod run`, figures for reads and writes. Figures are printed, never asserted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmiod.bench import vhost


def direct_io(path: Path) -> bool:
    probe = path / "probe"
    probe.write_bytes(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def test_the_qd1_benchmark_gives_figures_for_reads_and_writes(tmp_path: Path) -> None:
    if not direct_io(tmp_path):
        pytest.skip(f"{tmp_path}: no O_DIRECT (tmpfs?): the benchmark serves with cache: none")
    out = vhost.measure(50, 1, ["vmmiod"], str(tmp_path), poll_us=0)
    assert set(out) == {"vmmiod read round 1", "vmmiod write round 1"}, out
    for fig in out.values():
        assert fig["iops"] > 0 and 0 < fig["p50_us"] <= fig["p90_us"]
        assert fig["cpu_us_per_req"] >= 0
    assert [p.name for p in tmp_path.iterdir()] == ["probe"]  # its scratch directory is gone
