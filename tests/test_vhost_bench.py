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


def test_place_pins_every_backend_thread_and_the_front_end() -> None:
    """`--place`: the back-end's threads (all of them) on the first CPU, this process on the
    first (same) or the second (split); `none` and a split on one CPU pin nothing."""
    import subprocess
    import sys
    import time

    cpus = sorted(os.sched_getaffinity(0))
    code = ("import threading, time; threading.Thread(target=time.sleep, args=(30,), "
            "daemon=True).start(); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(50):  # bounded: the child's second thread starts at once
            if len(os.listdir(f"/proc/{child.pid}/task")) == 2:
                break
            time.sleep(0.1)
        tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) == 2
        assert vhost.place("none", [child.pid]) == "none"
        assert os.sched_getaffinity(tids[1]) == set(cpus)
        for mode in ("same", "split"):
            os.sched_setaffinity(0, set(cpus))  # (place takes the CPUs this process may use)
            got = vhost.place(mode, [child.pid])
            if mode == "split" and len(cpus) < 2:
                assert got.startswith("none") and os.sched_getaffinity(0) == set(cpus)
                continue
            front = cpus[0] if mode == "same" else cpus[1]
            assert got == f"{mode}: back-end on CPU {cpus[0]}, front-end on CPU {front}"
            assert all(os.sched_getaffinity(t) == {cpus[0]} for t in tids)
            assert os.sched_getaffinity(0) == {front}
    finally:
        os.sched_setaffinity(0, set(cpus))
        child.kill()
        child.wait()
