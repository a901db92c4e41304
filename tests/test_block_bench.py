"""The block benchmark's guest model moves real data and checks what the device returns."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from vmmiod.bench.block_disk import ClosedLoop, vmmiod_job
from vmmiod.memory import memfd_memory
from vmmiod.sim.vring import VIRTQ_USED_ELEM, Allocator, avail_event_offset
from vmmiod.sim.vring_slots import STATUS_UNSET, SlotDriver

GPA = 0x4000_0000
BLOCK = 4096


def test_closed_loop_reads_the_file_into_each_slot(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(256 * BLOCK))
    sectors = [(7 * i % 256) * BLOCK >> 9 for i in range(8)]

    async def body() -> None:
        cl = ClosedLoop(image, "auto", False, BLOCK, True, 8)
        await cl.start()
        try:
            cl.stopping = True  # one round: every completion is checked, nothing reissued
            for slot, sector in enumerate(sectors):
                cl.drv.issue(slot, sector)
            assert cl.drv.publish()
            cl.dev.queue_notify(0)
            await cl.drain()
            assert cl.done == 8 and cl.drv.outstanding == 0
            data = image.read_bytes()
            for slot, sector in enumerate(sectors):
                got = cl.mem.read(cl.drv.data[slot], BLOCK)
                assert got == data[sector << 9:(sector << 9) + BLOCK]
        finally:
            await cl.close()
    asyncio.run(body())


@pytest.mark.parametrize("write", [False, True])
def test_vmmiod_job_completes_requests(tmp_path: Path, write: bool) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    r = vmmiod_job(image, "auto", write, BLOCK, True, 4, 0.1)
    assert r["iops"] > 0 and r["cpu_us"] >= r["device_cpu_us"]


def test_slot_driver_rejects_what_a_device_must_not_return() -> None:
    mem, fd = memfd_memory(1 << 20, GPA)
    try:
        drv = SlotDriver(mem, Allocator(GPA, 1 << 20), 16, 4, BLOCK, 0, False)
        used = drv.used_addr
        drv.issue(2, 10)
        drv.publish()
        assert mem.read(drv.status + 2, 1)[0] == STATUS_UNSET

        def post(idx: int, head: int, length: int) -> None:
            mem.write(used + 4 + 8 * (idx % 16), VIRTQ_USED_ELEM.pack(head, length))
            mem.write_u16(used + 2, idx + 1)

        post(0, 2, BLOCK + 1)  # right slot and length, but the status byte was never written
        with pytest.raises(RuntimeError, match="status"):
            drv.reap()
        drv.last_used = 0
        post(0, 3, BLOCK + 1)  # a slot that is not in flight
        with pytest.raises(RuntimeError, match="not in flight"):
            drv.reap()
        mem.write(drv.status + 2, b"\0")
        post(0, 2, BLOCK + 1)
        assert drv.reap() == [2] and drv.outstanding == 0
        mem.write_u16(used + 2, 5)  # used.idx ahead of what is in flight
        with pytest.raises(RuntimeError, match="ahead"):
            drv.reap()
        # The device's avail_event decides the kick.
        mem.write_u16(used + avail_event_offset(16), 1)
        drv.issue(0, 0)
        assert drv.publish()  # 1 -> 2 passes event 1
        drv.issue(1, 0)
        assert not drv.publish()  # 2 -> 3 does not
    finally:
        mem.close()
        os.close(fd)


def test_block_benchmark_help_and_bad_options_run_nothing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m vmmiod.bench.block --help` prints its options; an unknown option is refused;
    neither starts the benchmark (several minutes of disk and CPU)."""
    from vmmiod.bench import block as bench_block

    def started(**_: object) -> None:
        raise AssertionError("the benchmark started")

    monkeypatch.setattr(bench_block, "run", started)
    with pytest.raises(SystemExit) as exc:
        bench_block.main(["--help"])
    assert exc.value.code == 0
    assert "--no-stack" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        bench_block.main(["--jobs", "randread"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --jobs" in capsys.readouterr().err


@pytest.mark.parametrize("area", ["virtqueue", "registers", "channel", "net", "console"])
def test_every_area_module_refuses_unknown_options(area: str) -> None:
    """`python -m vmmiod.bench.AREA --help` prints the options and runs nothing; an unknown
    option exits 2 (it used to be ignored while the benchmark ran)."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", f"vmmiod.bench.{area}", "--help"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "--quick" in ok.stdout, ok
    bad = subprocess.run([sys.executable, "-m", f"vmmiod.bench.{area}", "--no-such-option"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr, bad
