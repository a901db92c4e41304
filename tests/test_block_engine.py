"""BlockDevice on its I/O engine: FLUSH ordering, resets with I/O in flight, the fallback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.test_block_harness import (  # noqa: F401  (io_engine: the fixture)
    UNWRITTEN,
    Guest,
    block_config,
    io_engine,
    uring_available,
)
from vmmiod.config import GuestConfig
from vmmiod.devices.base import BackendError
from vmmiod.devices.block import BlockDevice
from vmmiod.devices.block_request import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(4 << 20))
    return p


def test_flush_waits_for_a_write_submitted_before_it(image: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A write still running when FLUSH arrives (same notification): the FLUSH's fdatasync
    starts only after the write has finished. Fails if FLUSH is not submitted as a barrier: the
    fdatasync on another pool thread completes while the write is held."""
    release = threading.Event()
    real = os.pwritev

    def slow(fd: int, views: list[memoryview], offset: int) -> int:
        if offset == 0:
            release.wait(10)
        return real(fd, views, offset)

    monkeypatch.setattr(os, "pwritev", slow)

    async def main() -> None:
        dev = BlockDevice(block_config(image, io_engine="threads"), GuestConfig("g"))
        await dev.open()
        g = Guest(dev)
        tw = g.submit(VIRTIO_BLK_T_OUT, 0, write=b"w" * 4096)
        tf = g.submit(VIRTIO_BLK_T_FLUSH)
        g.kick()
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert g.replies() == {}  # neither may complete while the write is held
        release.set()
        assert (await g.wait(tw)).status == VIRTIO_BLK_S_OK
        assert (await g.wait(tf)).status == VIRTIO_BLK_S_OK
        g.close()
        await dev.close()

    asyncio.run(main())


@pytest.mark.usefixtures("io_engine")
@pytest.mark.parametrize("how", ["device", "queue"])
def test_reset_with_reads_in_flight_writes_nothing_afterwards(image: Path, how: str) -> None:
    """32 reads (O_DIRECT where possible) in flight, then a device reset or a reset of their
    queue: once it returns, guest memory is never written again (data nor status) and nothing
    is completed into the ring."""
    async def main() -> None:
        dev = BlockDevice(block_config(image, cache="none"), GuestConfig("g"))
        await dev.open()
        g = Guest(dev)
        toks = [g.submit(VIRTIO_BLK_T_IN, (i * 97 % 1000) * 8, read=65536) for i in range(32)]
        g.kick()
        await asyncio.sleep(0)  # the queue work ran: the reads are with the engine
        if how == "device":
            dev.reset()
        else:
            dev.on_queue_reset(0)
            assert dev.counters["in_flight"] == 0
        g.dq[0].drain_used()  # what completed before the reset (the sync engine: all)
        guard = bytes([UNWRITTEN])
        for t in toks:  # what the guest reuses at once after the reset
            gpa, n, sgpa = g.pending[t]
            g.mem.write(gpa, guard * n)
            g.mem.write(sgpa, guard)
        for _ in range(5):
            await asyncio.sleep(0.01)
        for t in toks:
            gpa, n, sgpa = g.pending[t]
            assert g.mem.read(gpa, n) == guard * n
            assert g.mem.read(sgpa, 1) == guard
        assert g.dq[0].drain_used() == []  # nothing completed into the ring after the reset
        g.mem.close()
        await dev.close()

    asyncio.run(main())


# -- io_uring refused: the thread pool gives the same results --------------------------------
SECCOMP_CHILD = r"""
import ctypes, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
# seccomp filter: io_uring_setup (425) fails with EPERM, everything else is allowed.
prog = [(0x20, 0, 0, 0),            # ld [nr]
        (0x15, 0, 1, 425),          # jeq 425 ? next : skip
        (0x06, 0, 0, 0x00050000 | 1),  # ret ERRNO(EPERM)
        (0x06, 0, 0, 0x7FFF0000)]   # ret ALLOW
code = b"".join(struct.pack("HBBI", *i) for i in prog)
buf = ctypes.create_string_buffer(code)
fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
fbuf = ctypes.create_string_buffer(fprog)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.addressof(fbuf), 0, 0) == 0  # PR_SET_SECCOMP, FILTER
sys.path.insert(0, sys.argv[1])
from tests.test_block_engine import workload
print(workload(sys.argv[2], sys.argv[3]))
"""


def workload(path: str, engine: str) -> str:
    """Reads, writes, a flush, a discard through a BlockDevice; the engine and a digest."""
    from vmmiod.devices.block_request import VIRTIO_BLK_T_DISCARD
    dev = BlockDevice(block_config(Path(path), io_engine=engine), GuestConfig("g"))
    logged: list[dict[str, Any]] = []

    class Log:
        def __getattr__(self, level: str) -> Any:
            return lambda event, **kw: logged.append({"event": event, **kw})

        def bind(self, **kw: Any) -> Log:
            return self

    dev.log = Log()
    try:
        asyncio.run(dev.open())
    except BackendError as exc:
        return f"refused: {exc}"
    g = Guest(dev)
    h = hashlib.sha256()
    for i in range(16):
        g.run(VIRTIO_BLK_T_OUT, i * 64, write=bytes([i]) * 8192)
    toks = [g.submit(VIRTIO_BLK_T_IN, i * 40, read=16384) for i in range(24)]
    g.submit(VIRTIO_BLK_T_FLUSH)
    g.submit(VIRTIO_BLK_T_DISCARD, ranges=[(2048, 64, 0)])
    g.kick()
    reps = g.replies()
    for t in toks:
        h.update(bytes([reps[t].status]) + reps[t].data)
    g.close()
    asyncio.run(dev.close())
    (ev,) = [e for e in logged if e["event"] == "block_io_engine"]
    h.update(Path(path).read_bytes())
    return f"{ev['engine']} {ev['fallback_reason']} {h.hexdigest()}"


@pytest.mark.skipif(not uring_available(), reason="io_uring is not available on this machine")
def test_io_uring_refused_by_seccomp_falls_back_with_the_same_results(tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    for p in (a, b, c):
        p.write_bytes(data)
    mine = workload(str(a), "auto").split()
    assert mine[0] == "io_uring" and mine[1] == "None"

    def child(path: Path, engine: str) -> str:
        r = subprocess.run([sys.executable, "-c", SECCOMP_CHILD, str(ROOT), str(path), engine],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1]

    theirs = child(b, "auto").split(maxsplit=1)
    assert theirs[0] == "threads"
    reason, digest = theirs[1].rsplit(" ", 1)
    assert "not permitted" in reason  # EPERM, as the seccomp filter answers
    assert digest == mine[2]  # same statuses, same data read, same image afterwards
    refused = child(c, "io_uring")
    assert refused.startswith("refused:") and "io_engine" in refused


@pytest.mark.usefixtures("io_engine")
def test_worker_exception_fails_its_request_with_ioerr(image: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15 item 7: a blocking call on an engine thread raising something other than
    OSError (here the write-zeroes fallback) completes its request with IOERR, is logged, and
    the device keeps serving."""
    from vmmiod.blockio import op as op_mod
    from vmmiod.devices.block_backend import Backing
    from vmmiod.devices.block_request import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_WRITE_ZEROES

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(95, "Operation not supported")  # no ZERO_RANGE: the fallback runs

    def bug(self: Backing, offset: int, length: int, unmap: bool) -> None:
        raise ValueError("a bug in the fallback")

    monkeypatch.setattr(op_mod, "fallocate", refuse)
    monkeypatch.setattr(Backing, "write_zeroes", bug)
    dev = BlockDevice(block_config(image, io_engine="threads"), GuestConfig("g"))
    events: list[str] = []

    class Log:
        def __getattr__(self, level: str) -> Any:
            return lambda event, **kw: events.append(event)

        def bind(self, **kw: Any) -> Log:
            return self

    dev.log = Log()
    asyncio.run(dev.open())
    g = Guest(dev)
    r = g.run(VIRTIO_BLK_T_WRITE_ZEROES, ranges=[(8, 8, 0)])
    assert r.status == VIRTIO_BLK_S_IOERR
    assert "block_worker_exception" in events
    assert g.run(VIRTIO_BLK_T_IN, 0, read=512).status == VIRTIO_BLK_S_OK
    g.close()
    asyncio.run(dev.close())
