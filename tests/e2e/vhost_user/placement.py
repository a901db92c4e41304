"""CPU placement for the block side by side: the guest's vCPU on a CPU of its own.

Under TCG the guest's one vCPU is a QEMU thread that runs flat out. Left to the scheduler, a
backend woken by a kick lands now on the idle CPU, now on the vCPU's, where it waits for the
vCPU thread's time slice or takes it: the same fio round then varies by a third from one round to
the next, for either backend. A host that runs guests in production keeps vCPUs and I/O
back-ends apart; so does the benchmark, for both backends alike: from the guest's `E2E-B begin`
to its `E2E-B over` the vCPU thread ("CPU 0/TCG", QEMU's `-name ...,debug-threads=on`) is kept
on the last CPU the harness may use, and every other thread of QEMU and of the storage backends
(qemu-storage-daemon, vmmiod, their io_uring workers) on the others. Afterwards every one of them
gets the harness's whole CPU set back (the net side by side's testpmd places itself by lcore).
`VMMIOD_VU_PLACEMENT=0` turns it off; a host with one CPU, or a QEMU whose vCPU thread is not
found, runs unplaced, with the reason in run.json.
"""

from __future__ import annotations

import os
from pathlib import Path

VCPU_PREFIX = "CPU "  # QEMU's vCPU threads: "CPU 0/TCG", "CPU 1/KVM"...


def plan() -> tuple[set[int], set[int]] | str:
    """(the vCPU's CPU, the others') from the harness's own CPU set, or why there is none."""
    if os.environ.get("VMMIOD_VU_PLACEMENT", "1") == "0":
        return "turned off (VMMIOD_VU_PLACEMENT=0)"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return f"one CPU only ({cpus}): nothing to keep apart"
    return {cpus[-1]}, set(cpus[:-1])


def threads(pid: int) -> list[tuple[int, str]]:
    """(tid, name) of every thread of `pid` now; empty when it is gone."""
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for t in tasks:
        try:
            out.append((int(t.name), (t / "comm").read_text().strip()))
        except (OSError, ValueError):
            pass  # a thread that ended meanwhile
    return out


def _set(tid: int, cpus: set[int]) -> bool:
    try:
        os.sched_setaffinity(tid, cpus)
        return True
    except OSError:  # ended meanwhile
        return False


def place(qemu_pid: int, backend_pids: list[int], vcpu: set[int],
          rest: set[int]) -> dict[str, object]:
    """Put QEMU's vCPU threads on `vcpu` and every other thread of QEMU and of the backends on
    `rest`. Returns what was done (for run.json); "status" is "on", or "off" with a reason when
    QEMU has no thread named as a vCPU (nothing is moved then)."""
    qemu = threads(qemu_pid)
    vcpus = [tid for tid, name in qemu if name.startswith(VCPU_PREFIX)]
    if not vcpus:
        return {"status": "off", "reason": f"no thread named {VCPU_PREFIX!r}... in QEMU "
                                           f"({qemu_pid}): {sorted({n for _, n in qemu})}"}
    moved = sum(_set(tid, vcpu) for tid in vcpus)
    others = [tid for tid, name in qemu if not name.startswith(VCPU_PREFIX)]
    for pid in backend_pids:
        others += [tid for tid, _ in threads(pid)]
    moved_rest = sum(_set(tid, rest) for tid in others)
    return {"status": "on", "vcpu_cpus": sorted(vcpu), "other_cpus": sorted(rest),
            "vcpu_threads": moved, "other_threads": moved_rest}


def restore(pids: list[int], cpus: set[int]) -> int:
    """Give every thread of `pids` the CPU set `cpus` again; returns how many."""
    return sum(_set(tid, cpus) for pid in pids for tid, _ in threads(pid))
