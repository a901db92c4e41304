"""The vhost-user stage's CPU placement for the block side by side (tests/e2e/vhost_user/
placement.py), on real processes: a stand-in for QEMU with a thread named as its vCPU, a
stand-in for a storage backend, their threads' CPU sets read back from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "e2e" / "vhost_user"
sys.path.insert(0, str(HERE))

import placement

# A process with one more thread, named like QEMU's vCPU thread (or not), that sleeps.
CHILD = """
import os, sys, threading, time
def run():
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write(sys.argv[1])
    time.sleep(60)
threading.Thread(target=run, daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"""


def cpus_of(tid: int) -> set[int]:
    return os.sched_getaffinity(tid)


@pytest.fixture
def two_cpus() -> tuple[set[int], set[int], set[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"placement needs two CPUs; this test may use {cpus}")
    return {cpus[-1]}, set(cpus[:-1]), set(cpus)


@pytest.fixture
def spawn() -> Iterator[object]:
    procs: list[subprocess.Popen[str]] = []

    def start(thread_name: str) -> int:
        p = subprocess.Popen([sys.executable, "-c", CHILD, thread_name], stdout=subprocess.PIPE,
                             text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for _ in range(200):  # the named thread renames itself right after it starts
            if any(n == thread_name for _, n in placement.threads(p.pid)):
                break
            time.sleep(0.01)
        return p.pid

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_the_vcpu_thread_gets_its_own_cpu_and_everything_else_the_others(
        two_cpus: tuple[set[int], set[int], set[int]], spawn: object) -> None:
    vcpu, rest, everything = two_cpus
    qemu = spawn("CPU 0/TCG")  # type: ignore[operator]
    backend = spawn("iou-wrk-1")  # type: ignore[operator]
    done = placement.place(qemu, [backend], vcpu, rest)
    assert done["status"] == "on" and done["vcpu_threads"] == 1
    for tid, name in placement.threads(qemu):
        assert cpus_of(tid) == (vcpu if name == "CPU 0/TCG" else rest), name
    backend_threads = placement.threads(backend)
    assert len(backend_threads) == 2 and all(cpus_of(t) == rest for t, _ in backend_threads)
    assert done["other_threads"] == len(placement.threads(qemu)) - 1 + 2
    # Afterwards every thread has the whole set again.
    assert placement.restore([qemu, backend], everything) == 4
    for pid in (qemu, backend):
        assert all(cpus_of(t) == everything for t, _ in placement.threads(pid))


def test_a_qemu_without_a_named_vcpu_thread_is_left_alone(
        two_cpus: tuple[set[int], set[int], set[int]], spawn: object) -> None:
    vcpu, rest, everything = two_cpus
    qemu = spawn("qemu-system-x86")  # type: ignore[operator]
    backend = spawn("worker")  # type: ignore[operator]
    done = placement.place(qemu, [backend], vcpu, rest)
    assert done["status"] == "off" and "CPU " in str(done["reason"])
    for pid in (qemu, backend):
        assert all(cpus_of(t) == everything for t, _ in placement.threads(pid))


def test_the_plan_is_off_when_turned_off_or_with_one_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMMIOD_VU_PLACEMENT", "0")
    assert placement.plan() == "turned off (VMMIOD_VU_PLACEMENT=0)"
    monkeypatch.delenv("VMMIOD_VU_PLACEMENT")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert "one CPU" in str(placement.plan())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert placement.plan() == ({5}, {0, 2})


def test_a_process_that_is_gone_has_no_threads() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert placement.threads(p.pid) == []
    assert placement.restore([p.pid], {0}) == 0
