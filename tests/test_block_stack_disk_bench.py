"""The full-stack real-storage section of `vmmiod bench block` runs and reports (no timing)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from vmmiod.bench import block_disk, block_stack_disk


def _o_direct_refused(where: Path) -> str | None:
    probe = where / "o_direct_probe"
    probe.write_bytes(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError as exc:
        return os.strerror(exc.errno or errno.EINVAL)
    finally:
        probe.unlink()
    return None


def test_full_stack_on_real_storage_reports_every_job(tmp_path: Path) -> None:
    why = _o_direct_refused(tmp_path)
    if why is not None:
        pytest.skip(f"O_DIRECT refused by the filesystem of {tmp_path}: {why}")
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed: the section's reference column needs it")
    image = block_disk.make_image(tmp_path, 16 << 20)
    work = tmp_path / "stack"
    work.mkdir()
    res = block_stack_disk.run(image, work, quick=True, seconds=0.2)
    assert set(res["jobs"]) == {"randread-4k qd1", "randread-4k qd32", "randwrite-4k qd1",
                                "randwrite-4k qd32"}
    for job in res["jobs"].values():
        (r,) = job["rounds"].values()
        assert r["stack_iops"] > 0 and r["fio_iops"] > 0 and r["daemon_cpu_us"] >= 0
        assert r["ioreqs_per_request"] > 0  # at least the QueueNotify of the first batch
        assert job["median_ratio"] == r["ratio"]
    assert image.exists() and not (work / "disk.img").exists()
    lines = block_stack_disk.report(res)
    assert lines[0].startswith("full stack on real storage")
    assert any(line.startswith("randwrite-4k qd32") for line in lines)
