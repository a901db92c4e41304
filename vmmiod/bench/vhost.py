"""QD1 round trips through vmmiod's vhost-user-blk back-end, outside any guest.

The benchmark plays the VMM (QEMU's message order, the inflight record asked for like QEMU
does for vhost-user-blk, guest RAM in a sealed memfd, one ring of 128 built with the guest-side
driver model of vmmiod/sim/vring.py) against `vmmiod run` started as a child process on a
scratch image with `cache: none` (O_DIRECT), and does 4 KiB reads and writes one at a time:
write the request, kick, wait for the call, take the used element, repeat. It prints the
latency of one round trip (kick to used, as the front-end sees it) and the daemon's CPU per
request (its utime + stime over the run), the figures behind docs/vhost-user.md ("Per-request
cost"). With `--qsd` (and qemu-storage-daemon installed) the same loop runs against it, on
the same image, for a ratio. Figures only: nothing is asserted.

    python -m vmmiod.bench.vhost [--requests 3000] [--rounds 2] [--qsd] [--dir DIR]
                                 [--io-poll-us N] [--place none|same|split]

Where the scheduler puts the two sides decides much of a round trip on a small VM (a wake-up
across CPUs costs tens of microseconds there, on one CPU a few): `--place` pins them, so that
both back-ends are measured with the same wake-ups (docs/vhost-user.md, "Per-request cost").
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.memory import MappedMemory
from vmmiod.sim import vhost_front as front
from vmmiod.sim.sockets import connect_unix
from vmmiod.sim.vring import Allocator, DriverQueue

GPA, UVA = 0x1_0000_0000, 0x7F00_0000_0000
RAM = 8 << 20
RING = 128
IMAGE_MB = 64
WARMUP = 200
BLK_HDR = struct.Struct("<IIQ")
BLK_T_IN, BLK_T_OUT = 0, 1
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29


class FrontEnd:
    """Just enough of a vhost-user front-end for one virtio-blk ring."""

    def __init__(self, path: str, timeout: float = 20.0) -> None:
        self.sock = connect_unix(path, timeout)
        self.memfd = os.memfd_create("bench-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, RAM)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.ram = mmap.mmap(self.memfd, RAM, flags=mmap.MAP_SHARED)
        self.memory = MappedMemory()
        self.memory.add_buffer(GPA, self.ram)
        self.alloc = Allocator(GPA, RAM)
        self.fds: list[int] = [self.memfd]

    def send(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        front.send(self.sock, w.request(req, payload, need_reply=False), fds)

    def reply(self, req: int) -> tuple[bytes, list[int]]:
        got, _, body, fds = front.recv_message(self.sock)
        self.fds += fds
        if got != req:
            raise ConnectionError(f"reply to request {got}, {req} expected")
        return body, fds

    def u64(self, req: int) -> int:
        self.send(req)
        value: int = w.U64.unpack(self.reply(req)[0])[0]
        return value

    def setup(self) -> tuple[DriverQueue, int, int]:
        """QEMU's sequence up to a running ring 0; returns (queue, kick fd, call fd)."""
        features = self.u64(w.GET_FEATURES)
        protocol = self.u64(w.GET_PROTOCOL_FEATURES) & w.PROTOCOL_FEATURES
        protocol &= ~(1 << w.PROTOCOL_F_REPLY_ACK)  # no acks: fewer messages to read
        self.send(w.SET_PROTOCOL_FEATURES, w.U64.pack(protocol))
        self.send(w.SET_OWNER)
        self.send(w.SET_FEATURES, w.U64.pack(features))
        if protocol >> w.PROTOCOL_F_INFLIGHT_SHMFD & 1:
            self.send(w.GET_INFLIGHT_FD, w.INFLIGHT.pack(0, 0, 1, RING))
            body, fds = self.reply(w.GET_INFLIGHT_FD)
            self.send(w.SET_INFLIGHT_FD, body, (fds[0],))
        region = w.MemRegion(GPA, RAM, UVA, 0)
        self.send(w.SET_MEM_TABLE, w.pack_memory([region]), (self.memfd,))
        q = DriverQueue(self.memory, self.alloc, RING,
                        event_idx=bool(features >> VIRTIO_F_EVENT_IDX & 1),
                        indirect=bool(features >> VIRTIO_F_INDIRECT_DESC & 1))  # as Linux
        self.send(w.SET_VRING_NUM, w.STATE.pack(0, RING))
        self.send(w.SET_VRING_BASE, w.STATE.pack(0, 0))
        self.send(w.SET_VRING_ADDR, w.pack_addr(w.VringAddr(
            0, 0, q.desc_addr - GPA + UVA, q.used_addr - GPA + UVA, q.avail_addr - GPA + UVA, 0)))
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds += [kick, call]
        self.send(w.SET_VRING_CALL, w.U64.pack(0), (call,))
        self.send(w.SET_VRING_KICK, w.U64.pack(0), (kick,))
        self.send(w.SET_VRING_ENABLE, w.STATE.pack(0, 1))
        return q, kick, call

    def close(self) -> None:
        self.sock.close()
        self.memory.close()
        try:
            self.ram.close()
        except BufferError:
            pass
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, every thread


def qd1(path: str, pid: int, image_size: int, n: int, write: bool) -> dict[str, Any]:
    """`n` 4 KiB requests one at a time (after WARMUP); latency and the back-end's CPU."""
    fe = FrontEnd(path)
    try:
        q, kick, call = fe.setup()
        hdr, status = fe.alloc.alloc(16), fe.alloc.alloc(1)
        buf = fe.alloc.alloc(4096, align=4096)
        fe.memory.write(buf, os.urandom(4096))
        blocks = image_size // 4096
        rng = random.Random(1)
        lat: list[float] = []
        c0, t0 = 0, 0.0
        for i in range(n + WARMUP):
            if i == WARMUP:
                c0, t0 = cpu_ticks(pid), time.perf_counter()
            fe.memory.write(hdr, BLK_HDR.pack(BLK_T_OUT if write else BLK_T_IN, 0,
                                              rng.randrange(blocks) * 8))
            if write:
                q.add([(hdr, 16), (buf, 4096)], [(status, 1)], i)
            else:
                q.add([(hdr, 16)], [(buf, 4096), (status, 1)], i)
            start = time.perf_counter()
            os.eventfd_write(kick, 1)
            while not q.drain_used():
                if not select.select([call], [], [], 10)[0]:
                    raise TimeoutError(f"no call for request {i}")
                try:
                    os.eventfd_read(call)
                except BlockingIOError:
                    pass
            if i >= WARMUP:
                lat.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - t0
        cpu = (cpu_ticks(pid) - c0) / os.sysconf("SC_CLK_TCK")
    finally:
        fe.close()
    lat.sort()
    return {"iops": round(n / elapsed), "p50_us": round(lat[n // 2] * 1e6, 1),
            "p90_us": round(lat[n * 9 // 10] * 1e6, 1),
            "cpu_us_per_req": round(cpu / n * 1e6, 1)}


def start_backend(kind: str, work: Path, image: Path,
                  poll_us: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    path = str(work / f"{kind}.sock")
    if kind == "qsd":
        file_node = (f"driver=file,node-name=f0,filename={image},cache.direct=on,"
                     "aio=io_uring,locking=off")
        export = (f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={path},node-name=d0,"
                  "writable=on,num-queues=1")
        cmd = ["qemu-storage-daemon", "--blockdev", file_node, "--blockdev",
               "driver=raw,node-name=d0,file=f0", "--export", export]
    else:
        cfg = work / "vmmiod.yaml"
        cfg.write_text("guest: {name: bench}\nhypervisor: {kind: vhost-user}\n"
                       "log: {level: warning, stats_interval: 0}\ndevices:\n"
                       f"  - {{type: block, id: d0, path: '{image}', cache: none, lock: false, "
                       f"vhost_user: '{path}', queue_size: {RING}"
                       + ("" if poll_us is None else f", io_poll_us: {poll_us}") + "}\n")
        cmd = [sys.executable, "-m", "vmmiod", "run", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, path


PLACES = ("none", "same", "split")


def place(mode: str, pids: list[int]) -> str:
    """Pin every thread of the back-end processes `pids` and this process (the front-end):
    `same` all on one CPU, `split` the back-ends on one and the front-end on another, `none`
    left to the scheduler. Returns what was done, for the output."""
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "none" or (mode == "split" and len(cpus) < 2):
        return "none" if mode == "none" else "none (split needs two CPUs)"
    backend, front = cpus[0], cpus[0] if mode == "same" else cpus[1]
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), {backend})
            except OSError:  # a thread that ended meanwhile
                pass
    os.sched_setaffinity(0, {front})
    return f"{mode}: back-end on CPU {backend}, front-end on CPU {front}"


def measure(n: int, rounds: int, backends: list[str], where: str | None,
            poll_us: int | None = None, placement: str = "none") -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vmmiod-bench-vhost-", dir=where))
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.writelines(os.urandom(1 << 20) for _ in range(IMAGE_MB))
        try:  # O_DIRECT is what cache: none asks for; tmpfs refuses it
            os.close(os.open(image, os.O_RDONLY | os.O_DIRECT))
        except OSError as exc:
            return {"error": f"{work}: no O_DIRECT ({exc.strerror}): use --dir on a disk"}
        for kind in backends:
            procs[kind] = start_backend(kind, work, image, poll_us)
        out: dict[str, Any] = {}
        if placement != "none":
            time.sleep(0.5)  # (the back-ends' threads started)
            out["placement"] = place(placement, [proc.pid for proc, _ in procs.values()])
        for r in range(rounds):
            order = backends if r % 2 == 0 else backends[::-1]  # load drifts: alternate
            for op in ("read", "write"):
                for kind in order:
                    proc, path = procs[kind]
                    fig = qd1(path, proc.pid, IMAGE_MB << 20, n, op == "write")
                    out[f"{kind} {op} round {r + 1}"] = fig
        for op in ("read", "write"):
            if len(backends) == 2:
                ratios = [out[f"vmmiod {op} round {r + 1}"]["iops"]
                          / out[f"qsd {op} round {r + 1}"]["iops"] for r in range(rounds)]
                out[f"QD1 {op} IOPS ratio vmmiod/qsd per round"] = [round(x, 2) for x in ratios]
        return out
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def run(quick: bool) -> dict[str, Any]:
    """`vmmiod bench vhost`: vmmiod alone (a ratio needs --qsd through this module's CLI)."""
    return measure(500 if quick else 3000, 1 if quick else 2, ["vmmiod"], None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmmiod.bench.vhost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000, help="per job and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--qsd", action="store_true", help="qemu-storage-daemon side by side")
    p.add_argument("--dir", default=None, help="scratch directory (a disk, not tmpfs)")
    p.add_argument("--io-poll-us", type=int, default=None,
                   help="vmmiod's io_poll_us (0: no completion poll); default: vmmiod's")
    p.add_argument("--place", choices=PLACES, default="none",
                   help="pin the back-ends and the front-end: on one CPU (same), on two "
                        "(split), or not at all (none, the default)")
    a = p.parse_args(argv)
    backends = ["vmmiod"]
    if a.qsd:
        if shutil.which("qemu-storage-daemon") is None:
            print("qemu-storage-daemon is not installed", file=sys.stderr)
            return 69
        backends.append("qsd")
    for key, value in measure(a.requests, a.rounds, backends, a.dir, a.io_poll_us,
                              a.place).items():
        print(f"{key:<44} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
