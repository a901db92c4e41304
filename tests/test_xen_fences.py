"""arm64 barriers: the encodings, and the two mechanisms run for real on this machine's CPU.

The code-page mechanism is the same on both architectures; on x86-64 it is proven with
mfence/sfence/lfence code, since arm64 code cannot run here.
"""

from __future__ import annotations

import platform
import struct

import pytest
import structlog

from vmmiod import barrier
from vmmiod.hypervisors.xen import fences


def test_a64_encodings() -> None:
    # DMB <option>: 1101 0101 0000 0011 0011 CRm 1 01 11111; ISH=1011, ISHST=1010, ISHLD=1001.
    def dmb(crm: int) -> int:
        return 0xD503_309F | crm << 8 | 0x20

    assert fences.A64_DMB_ISH == dmb(0b1011) == 0xD5033BBF
    assert fences.A64_DMB_ISHST == dmb(0b1010) == 0xD5033ABF
    assert fences.A64_DMB_ISHLD == dmb(0b1001) == 0xD50339BF
    assert fences.A64_RET == 0xD65F03C0  # RET X30
    code = fences.a64_fence_code()
    assert struct.unpack("<6I", code) == (0xD5033BBF, 0xD65F03C0, 0xD5033ABF, 0xD65F03C0,
                                          0xD50339BF, 0xD65F03C0)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 code")
def test_code_page_runs_and_is_not_writable() -> None:
    mb, wmb, rmb = fences.code_page_fences(fences.x86_fence_code())
    for f in (mb, wmb, rmb):
        for _ in range(1000):
            f()
    # The page is mapped read+execute only: no W+X mapping exists in the process.
    with open("/proc/self/maps") as maps:
        lines = [ln for ln in maps if "vmmiod-fences" in ln]
    assert lines and all(ln.split()[1].startswith("r-x") for ln in lines)


def test_libatomic_fence_runs() -> None:
    try:
        mb, wmb, rmb = fences.libatomic_fences()
    except OSError:
        pytest.skip("libatomic.so.1 is not installed")
    for f in (mb, wmb, rmb):
        f()


def test_nothing_installed_on_x86() -> None:
    before = (barrier.mb, barrier.wmb, barrier.rmb)
    assert fences.install_fences(structlog.get_logger(), machine="x86_64") == "tso"
    assert (barrier.mb, barrier.wmb, barrier.rmb) == before


def test_arm64_choice_installs_into_the_barrier_module(monkeypatch: pytest.MonkeyPatch) -> None:
    # On x86 the arm64 page cannot run: stand in this CPU's fences for the page's code.
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 code")
    monkeypatch.setattr(fences, "a64_fence_code", fences.x86_fence_code)
    saved = (barrier.mb, barrier.wmb, barrier.rmb)
    try:
        assert fences.install_fences(structlog.get_logger(), machine="aarch64") == "code_page"
        assert barrier.mb is not saved[0] and barrier.wmb is not saved[1]
        barrier.mb()
        barrier.wmb()
        barrier.rmb()
    finally:
        barrier.install(*saved)
