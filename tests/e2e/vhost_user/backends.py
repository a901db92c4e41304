"""The host side of a vhost-user e2e run: network namespace and TAP, iperf3 server, the backends
(qemu-storage-daemon, vmmiod) with their CPU accounting, the kill-and-restart, and the figures.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import netmirror
import placement
from procs import CLK_TCK, STOP_WAIT, Proc, cpu_ticks

KILL_WATCH = 30.0  # seconds the kill waits for requests in flight before it kills anyway
KILL_ATTEMPTS = 3  # kills at most, until a restarted vmmiod redid requests (kill_and_restart)
KILL_DEVICE = "verify"  # the disk the guest's fio writes during the kill
RESUME_WAIT = 60.0  # seconds for a restarted vmmiod to resume that disk's ring
INFLIGHT_NAME = "/memfd:vmmiod-inflight"  # vmmiod's inflight records, as QEMU's fds show them


def inflight_counts(fds: list[int]) -> list[int]:
    """Heads marked in flight in each of vmmiod's inflight records (docs/vhost-user.md,
    "Inflight I/O and restarts": per queue a 16-byte head whose desc_num is the u16 at 10, then
    desc_num 16-byte entries whose first byte is the mark, the queue's part rounded up to 64)."""
    counts = []
    for fd in fds:
        buf = os.pread(fd, 1 << 20, 0)
        n = pos = 0
        while pos + 16 <= len(buf):
            desc_num = int.from_bytes(buf[pos + 10:pos + 12], "little")
            if desc_num == 0:  # a queue never started
                break
            n += sum(1 for b in buf[pos + 16:pos + 16 + 16 * desc_num:16] if b)
            pos += (16 + 16 * desc_num + 63) // 64 * 64
        counts.append(n)
    return counts


def _stopped(pid: int, limit: float = 2.0) -> bool:
    """Wait (bounded) until `pid` is in state T (stopped by SIGSTOP)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat[stat.rindex(")") + 2] in "tT":
            return True
        time.sleep(0.0002)
    return False


def freeze_with_inflight(qemu_pid: int, pid: int, limit: float) -> tuple[int | None, float]:
    """Wait (bounded) for a moment when process `pid` (vmmiod) holds requests in flight, and
    leave it stopped then: watch its inflight records (found among QEMU's fds), SIGSTOP it when
    one marks a request, and keep it stopped only if the record still marks one once it is
    stopped (a stopped process cannot complete it); otherwise SIGCONT and watch on. Returns
    (requests marked in flight, seconds watched); None: none seen, `pid` left running."""
    fds: list[int] = []
    start = time.monotonic()
    stopped = False
    try:
        for entry in Path(f"/proc/{qemu_pid}/fd").iterdir():
            try:
                if os.readlink(entry).startswith(INFLIGHT_NAME):
                    fds.append(os.open(entry, os.O_RDONLY))
            except OSError:
                continue
        while fds and time.monotonic() - start < limit:
            if max(inflight_counts(fds)):
                os.kill(pid, signal.SIGSTOP)
                stopped = True
                seen = max(inflight_counts(fds)) if _stopped(pid) else 0
                if seen:
                    stopped = False  # left stopped on purpose: the caller kills it
                    return seen, time.monotonic() - start
                os.kill(pid, signal.SIGCONT)
                stopped = False
            time.sleep(0.0005)
        return None, time.monotonic() - start
    except OSError:
        return None, time.monotonic() - start
    finally:
        if stopped:  # never leave it stopped by accident: the guest would wait forever
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        for fd in fds:
            os.close(fd)


def resubmitted(log: Path, device: str, limit: float) -> int | None:
    """The `resubmit` of `device`'s first vhost_user_inflight_resumed in vmmiod's JSON log,
    waited for (bounded); None when it did not come."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == "vhost_user_inflight_resumed" and e.get("device") == device:
                return int(e.get("resubmit", 0))
        time.sleep(0.2)
    return None


def qsd_command(exports: list[tuple[str, Path, Path]]) -> list[str]:
    """qemu-storage-daemon serving (id, image, socket) as vhost-user-blk exports."""
    cmd = ["qemu-storage-daemon"]
    for ident, image, sock in exports:
        # locking=off: vmmiod serves the same benchmark image at the same time.
        cmd += ["--blockdev", (f"driver=file,node-name=f-{ident},filename={image},"
                               "cache.direct=on,aio=io_uring,locking=off"),
                "--blockdev", f"driver=raw,node-name={ident},file=f-{ident}",
                "--export", (f"type=vhost-user-blk,id=e-{ident},addr.type=unix,"
                             f"addr.path={sock},node-name={ident},writable=on,num-queues=1")]
    return cmd


def vmmiod_config(results: Path, socks: dict[str, Path], params: dict[str, Any], net: bool,
                  disks: tuple[str, ...] = ("ext4", "verify", "bench"),
                  mirror: tuple[Path, Path] | None = None) -> str:
    """vmmiod's YAML for the devices it serves (docs/vhost-user.md)."""
    lines = [
        "# Written by tests/e2e/vhost_user/run for one run.",
        "guest: {name: vu-e2e}",
        "hypervisor: {kind: vhost-user, reconnect: 1}",
        "log: {level: info, format: json, stats_interval: 0}",
        "devices:",
    ]
    for ident, image, lock in (("ext4", "ext4.img", True), ("verify", "verify.img", True),
                               ("bench", "bench.img", False)):
        if ident not in disks:
            continue
        lines += ["  - type: block", f"    id: {ident}", f"    path: {results / image}",
                  "    cache: none", f"    vhost_user: {socks[ident]}"]
        if not lock:  # qemu-storage-daemon serves the same image in the side-by-side benchmark
            lines.append("    lock: false")
        if params.get("VMMIOD_IO_ENGINE"):  # vmmiod's default otherwise (docs/configuration.md)
            lines.append(f"    io_engine: {params['VMMIOD_IO_ENGINE']}")
        poll = str(params.get("VMMIOD_IO_POLL_US", ""))
        if poll.isdigit():
            lines.append(f"    io_poll_us: {int(poll)}")
        elif ident == "bench":
            # The daemon shares the host's CPUs with the guest's TCG vCPU: the case where
            # docs/configuration.md says to turn the completion poll off. The other disks keep
            # vmmiod's default (50), so a real guest still drives the polled path.
            lines.append("    io_poll_us: 0")
        if params.get("QUEUE_SIZE"):
            lines.append(f"    queue_size: {params['QUEUE_SIZE']}")
    if net:
        lines += ["  - type: net", "    id: net0", f"    mac: \"{params['NET_MAC']}\"",
                  f"    backend: {{kind: tap, ifname: {params['TAP_IF']}, create: false}}",
                  f"    vhost_user: {socks['net']}"]
        if params.get("QUEUE_SIZE"):
            lines.append(f"    queue_size: {params['QUEUE_SIZE']}")
    if mirror is not None:  # the net side by side: dgram to the swapping peer (netmirror.py)
        local, remote = mirror
        lines += ["  - type: net", "    id: mirror", f"    mac: \"{params['MIRROR_MAC_VMMIOD']}\"",
                  f"    backend: {{kind: dgram, local: \"unix:{local}\", remote: \"unix:{remote}\"}}",
                  f"    vhost_user: {socks['mirror']}"]
    return "\n".join(lines) + "\n"


class Stack:
    """Everything the guest talks to, started before QEMU and torn down after it."""

    def __init__(self, results: Path, params: dict[str, Any], *, dut: str, bench: list[str],
                 net: bool, repo: Path,
                 disks: tuple[str, ...] = ("ext4", "verify", "bench"),
                 testpmd: dict[str, Any] | None = None) -> None:
        self.results, self.params, self.dut_kind, self.net = results, params, dut, net
        self.disks = disks  # the microvm pass: ("verify",) and no benchmark backend
        self.repo = repo
        self.sockdir = Path(tempfile.mkdtemp(prefix="vu-e2e-"))  # short: sun_path has 108 bytes
        self.netns = f"vmmiod-vu-{os.getpid()}" if net else None
        self.procs: dict[str, Proc] = {}
        self.iperf: subprocess.Popen[bytes] | None = None
        self.samples: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.bench = bench
        self.qemu_pid: int | None = None  # set by the guest once QEMU runs (the kill's watch)
        # The block side by side's CPU placement (placement.py), as run.json reports it.
        self.placement: dict[str, object] = {"status": "off", "reason": "no benchmark ran"}
        self.mirror: netmirror.Mirror | None = None  # the net side by side (NET_MIRROR=1)
        self.mirror_failed: str | None = None  # why it is left out after all (a failed start)
        if params.get("NET_MIRROR") == 1 and testpmd is not None:
            self.mirror = netmirror.Mirror(
                results, testpmd, str(params["MIRROR_LCORES"]), self.sock("testpmd"),
                self.sockdir / "peer.dgram", sys.executable, self.in_ns)

    def sock(self, name: str) -> Path:
        return self.sockdir / f"{name}.sock"

    def in_ns(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        if self.netns:
            tap, host_ip = self.params["TAP_IF"], self.params["HOST_IP"]
            for cmd in (["ip", "netns", "add", self.netns],
                        ["ip", "-n", self.netns, "link", "set", "lo", "up"],
                        ["ip", "-n", self.netns, "tuntap", "add", "dev", tap, "mode", "tap"],
                        ["ip", "-n", self.netns, "addr", "add", f"{host_ip}/24", "dev", tap],
                        ["ip", "-n", self.netns, "link", "set", tap, "up"]):
                subprocess.run(cmd, check=True, timeout=30)
            with open(self.results / "iperf3-server.log", "wb") as f:
                self.iperf = subprocess.Popen(
                    self.in_ns(["iperf3", "-s", "-B", str(host_ip), "--forceflush"]),
                    stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True)
        r = self.results
        if self.bench:
            self.procs["qsd"] = Proc("qemu-storage-daemon (benchmark)",
                qsd_command([("bench", r / "bench.img", self.sock("qsd-bench"))]),
                r / "qsd-bench.log", [self.sock("qsd-bench")])
        if self.dut_kind == "vmmiod":
            socks = {n: self.sock(f"dut-{n}") for n in ("ext4", "verify", "bench", "net", "mirror")}
            cfg = r / "vmmiod.yaml"
            dgram = (self.sockdir / "vmmiod.dgram", self.sockdir / "peer.dgram")
            cfg.write_text(vmmiod_config(r, socks, self.params, self.net, self.disks,
                                         dgram if self.mirror else None))
            py = self.repo / ".venv/bin/python"
            cmd = self.in_ns([str(py if py.exists() else "python3"), "-m", "vmmiod", "run",
                              str(cfg)])
            wanted = [socks[d] for d in self.disks]
            self.procs["dut"] = Proc("vmmiod", cmd, r / "dut-1.log",
                                     wanted + ([socks["net"]] if self.net else [])
                                     + ([socks["mirror"]] if self.mirror else []),
                                     cwd=self.repo)  # `python -m vmmiod` from the checkout
        else:
            exports = [("ext4", r / "ext4.img", self.sock("dut-ext4")),
                       ("verify", r / "verify.img", self.sock("dut-verify"))]
            self.procs["dut"] = Proc("qemu-storage-daemon (under test)", qsd_command(exports),
                                     r / "dut-1.log", [s for _, _, s in exports])
        for p in self.procs.values():
            p.start()
        if self.mirror:  # testpmd must answer when QEMU starts: QEMU waits for a net back-end
            try:
                for p in self.mirror.procs().values():
                    p.start()
            except SystemExit as exc:  # the net side by side is left out, nothing else
                for p in self.mirror.procs().values():
                    p.stop()
                self.mirror_failed = str(exc)
                self.mirror = None
            else:
                self.procs.update(self.mirror.procs())

    def bench_proc(self, be: str) -> Proc:
        return self.procs["qsd"] if be == "qsd" else self.procs["dut"]

    # -- called from the console reader ---------------------------------------------------------
    def place(self) -> None:
        """The guest begins the block side by side: its vCPU on a CPU of its own, QEMU's other
        threads and the storage backends on the others (placement.py)."""
        cpus = placement.plan()
        if isinstance(cpus, str):
            self.placement = {"status": "off", "reason": cpus}
        elif self.qemu_pid is None:
            self.placement = {"status": "off", "reason": "QEMU's pid is not known"}
        else:
            self.placement = placement.place(self.qemu_pid, self._storage_pids(), *cpus)
        self.event("placement", **self.placement)

    def _storage_pids(self) -> list[int]:
        return [p.pid for p in (self.procs.get("qsd"), self.procs.get("dut"))
                if p is not None and p.pid is not None]

    def unplace(self) -> None:
        """The side by side is over: every thread placed gets the harness's CPU set back
        (testpmd's threads keep their lcores: they were never placed)."""
        if self.placement.get("status") != "on" or self.qemu_pid is None:
            return
        n = placement.restore([self.qemu_pid, *self._storage_pids()], os.sched_getaffinity(0))
        self.event("placement_over", threads=n)

    def bench_mark(self, edge: str, job: str, be: str, rnd: int) -> None:
        p = self.bench_proc(be)
        ticks = cpu_ticks(p.pid) if p.pid else None
        with self.lock:
            s = self.samples.setdefault(f"{be}/{job}/{rnd}", {"pid": p.pid})
            s[edge] = ticks
            s[f"t_{edge}"] = time.monotonic()

    def net_line(self, text: str) -> None:
        """A guest's `E2E-N` line (the net side by side's rounds: netmirror.Mirror.on_line)."""
        if self.mirror:
            self.mirror.on_line(text, self.procs["dut"])

    def kill_and_restart(self) -> None:
        """SIGKILL the backend under test and start it again KILL_DOWN s later. vmmiod is
        killed at a moment its inflight record marks requests in flight (freeze_with_inflight:
        stopped, checked, killed), and again (at most KILL_ATTEMPTS times, only while requests
        are seen in flight) until a restarted instance reports the KILL_DEVICE ring's requests
        redone: a kill right after a completion was published leaves nothing to redo."""
        dut = self.procs["dut"]
        for attempt in range(1, KILL_ATTEMPTS + 1):
            seen, waited = None, 0.0
            if self.dut_kind == "vmmiod" and self.qemu_pid is not None and dut.pid is not None:
                seen, waited = freeze_with_inflight(self.qemu_pid, dut.pid, KILL_WATCH)
                if seen is None and attempt > 1:
                    break  # the guest's fio is over: nothing left to catch in flight
            t = time.monotonic()
            dut.kill9()
            self.event("killed", pid=dut.history[-1]["pid"], attempt=attempt,
                       inflight_seen=seen, watched_seconds=round(waited, 3))
            time.sleep(float(self.params["KILL_DOWN"]))
            # QEMU reconnects by itself (reconnect=1); the sockets are not awaited here.
            log = self.results / f"dut-{attempt + 1}.log"
            dut.start(log, wait_sockets=False)
            redone = resubmitted(log, KILL_DEVICE, RESUME_WAIT) \
                if self.dut_kind == "vmmiod" else None
            self.event("restarted", pid=dut.pid, down_seconds=round(time.monotonic() - t, 2),
                       resubmit=redone)
            if redone or self.dut_kind != "vmmiod" or seen is None:
                break

    def event(self, what: str, **kw: Any) -> None:
        with self.lock:
            self.events.append({"event": what, "t": time.monotonic(), **kw})

    def died(self) -> str | None:
        for p in self.procs.values():
            rc = p.died()
            if rc is not None:
                return f"{p.name} exited unexpectedly ({rc})"
        return None

    def summary(self) -> dict[str, Any]:
        return {name: {"cmd": p.cmd, "history": p.history} for name, p in self.procs.items()}

    def __exit__(self, *exc: object) -> None:
        for p in self.procs.values():
            p.stop()
        if self.iperf is not None:
            self.iperf.terminate()
            try:
                self.iperf.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.iperf.kill()
                self.iperf.wait()
        if self.netns:
            subprocess.run(["ip", "netns", "del", self.netns], check=False, timeout=30)
        shutil.rmtree(self.sockdir, ignore_errors=True)
        cpu = {"clk_tck": CLK_TCK, "samples": self.samples, "events": self.events,
               "net_samples": self.mirror.samples if self.mirror else {}}
        (self.results / "cpu.json").write_text(json.dumps(cpu, indent=1))
        (self.results / "backends.json").write_text(json.dumps(self.summary(), indent=1))


def vmmiod_engine(results: Path, device: str = "bench") -> str | None:
    """The I/O engine vmmiod's first instance served `device` with (its block_io_engine event)."""
    try:
        lines = (results / "dut-1.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "block_io_engine" and e.get("device") == device:
            return str(e.get("engine"))
    return None


# -- figures ------------------------------------------------------------------------------------
JOBS = ["randread-qd1", "randread-qd32", "randwrite-qd1", "randwrite-qd32", "seqread-1m",
        "seqwrite-1m"]


def _fio(path: Path) -> tuple[int, int] | None:
    """(requests, runtime in ms) of one fio round; None when it is missing or failed."""
    try:
        job = json.loads(path.read_text())["jobs"][0]
        if job.get("error"):
            return None
        return (int(job["read"]["total_ios"]) + int(job["write"]["total_ios"]),
                int(job["job_runtime"]))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _rounds(results: Path, cpu: dict[str, Any], be: str, job: str) -> dict[int, Any] | None:
    """Round number -> (requests, runtime ms, CPU ticks, wall seconds) of `be` in `job`; None
    when any round it started is missing or incomplete (a figure from part of a job would
    compare unlike things)."""
    out: dict[int, Any] = {}
    for key, s in cpu["samples"].items():
        b, _, rest = key.partition("/")
        j, _, rnd = rest.partition("/")
        if b != be or j != job or not rnd.isdigit():
            continue
        fio = _fio(results / f"bench-{be}-{job}-r{rnd}.json")
        if fio is None or s.get("start") is None or s.get("end") is None or not fio[1]:
            return None
        out[int(rnd)] = (fio[0], fio[1], s["end"] - s["start"], s["t_end"] - s["t_start"])
    return out or None


def bench_figures(results: Path, bench: list[str]) -> dict[str, Any]:
    """Per job and backend, over all of the job's rounds: the guest's IOPS (requests / fio's
    runtime) and the backend's CPU per request; the ratios of the totals, and of each round
    (vmmiod's against qemu-storage-daemon's in the same round, next to each other in time)."""
    try:
        cpu = json.loads((results / "cpu.json").read_text())
    except (OSError, ValueError):
        cpu = {"samples": {}, "clk_tck": CLK_TCK}
    figures: dict[str, Any] = {}
    for job in JOBS:
        row: dict[str, Any] = {}
        rounds: dict[str, dict[int, Any]] = {}
        for be in bench:
            r = _rounds(results, cpu, be, job)
            if r is None:
                row[be] = None
                continue
            rounds[be] = r
            ios = sum(x[0] for x in r.values())
            runtime_ms = sum(x[1] for x in r.values())
            cpu_s = sum(x[2] for x in r.values()) / cpu["clk_tck"]
            row[be] = {"iops": round(ios * 1000 / runtime_ms), "ios": ios, "cpu_seconds": cpu_s,
                       "wall_seconds": round(sum(x[3] for x in r.values()), 2),
                       "rounds": len(r),
                       "round_iops": [round(r[n][0] * 1000 / r[n][1]) for n in sorted(r)],
                       "cpu_us_per_request": round(cpu_s * 1e6 / ios, 1) if ios else None}
        q, v = row.get("qsd"), row.get("vmmiod")
        if q and v:
            row["iops_ratio"] = round(v["iops"] / q["iops"], 3) if q["iops"] else None
            qc, vc = q["cpu_us_per_request"], v["cpu_us_per_request"]
            row["cpu_ratio"] = round(vc / qc, 2) if qc else None
            rq, rv = rounds["qsd"], rounds["vmmiod"]
            row["round_ratios"] = [round((rv[n][0] / rv[n][1]) / (rq[n][0] / rq[n][1]), 3)
                                   for n in sorted(set(rq) & set(rv)) if rq[n][0]]
        figures[job] = row
    return figures


def bench_table(figures: dict[str, Any]) -> str:
    head = (f"{'job':<15} {'qsd IOPS':>9} {'qsd us/req':>10} {'vmmiod IOPS':>11} "
            f"{'vmmiod us/req':>13} {'IOPS ratio':>10} {'CPU ratio':>9}  rounds' IOPS ratios")
    lines = ["side-by-side (guest IOPS; backend CPU utime+stime per request)", head]

    def f(x: Any, key: str) -> str:
        return "-" if not x or x.get(key) is None else f"{x[key]:,}"

    for job, row in figures.items():
        q, v = row.get("qsd"), row.get("vmmiod")
        each = " ".join(f"{x:.2f}" for x in row.get("round_ratios", []))
        lines.append(f"{job:<15} {f(q, 'iops'):>9} {f(q, 'cpu_us_per_request'):>10} "
                     f"{f(v, 'iops'):>11} {f(v, 'cpu_us_per_request'):>13} "
                     f"{row.get('iops_ratio', '-')!s:>10} {row.get('cpu_ratio', '-')!s:>9}  "
                     f"{each or '-'}")
    return "\n".join(lines)
