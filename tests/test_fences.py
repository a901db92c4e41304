"""Memory fences: the encodings, both mechanisms run for real on this machine's CPU, and what
`vmmiod.fences.install` puts into vmmiod.barrier on x86-64 and on arm64.

The code-page mechanism is the same on both architectures; arm64's page cannot run here, so
the arm64 choice is checked with this CPU's fence code standing in for it. Whether the fence
really orders a store before a later load is the litmus test's job (tests/test_fence_litmus.py).
"""

from __future__ import annotations

import platform
import struct
from collections.abc import Iterator

import pytest
import structlog

from vmmiod import barrier, fences

X86 = platform.machine() == "x86_64"


@pytest.fixture
def saved_barriers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    saved = (barrier.mb, barrier.wmb, barrier.rmb)
    monkeypatch.setattr(fences, "_installed", None)
    yield
    barrier.install(*saved)


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


def test_x86_encodings() -> None:
    code = fences.x86_fence_code()
    assert code[0:4] == b"\x0f\xae\xf0\xc3"  # mfence; ret
    assert code[8:12] == b"\x0f\xae\xf8\xc3"  # sfence; ret
    assert code[16:20] == b"\x0f\xae\xe8\xc3"  # lfence; ret


@pytest.mark.skipif(not X86, reason="x86-64 code")
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


@pytest.mark.skipif(not X86, reason="x86-64 code")
def test_x86_gets_a_real_full_fence_and_no_other(saved_barriers: None) -> None:
    """x86-64 lets a later load pass an earlier store: mb() must be a real fence there
    (it was a no-op); wmb()/rmb() stay no-ops (TSO keeps those orders)."""
    barrier.uninstall()
    assert barrier.mb is barrier._noop  # what the data path had before this issue
    assert fences.install(structlog.get_logger(), machine="x86_64") == "code_page"
    assert barrier.mb is not barrier._noop
    assert barrier.wmb is barrier.rmb is fences._noop
    barrier.mb()
    # Installed once: a second call changes nothing.
    mb = barrier.mb
    assert fences.install(structlog.get_logger()) == "code_page" and barrier.mb is mb


@pytest.mark.skipif(not X86, reason="x86-64 code")
def test_x86_falls_back_to_libatomic(saved_barriers: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(code: bytes) -> object:
        raise OSError(1, "memfd not executable")
    monkeypatch.setattr(fences, "code_page_fences", refused)
    try:
        fences.libatomic_fences()
    except OSError:
        with pytest.raises(fences.FencesUnavailable, match="install libatomic1"):
            fences.install(structlog.get_logger(), machine="x86_64")
        return
    assert fences.install(structlog.get_logger(), machine="x86_64") == "libatomic"
    assert barrier.mb is not barrier._noop and barrier.wmb is fences._noop
    barrier.mb()


def test_unknown_cpu_is_refused(saved_barriers: None) -> None:
    with pytest.raises(fences.FencesUnavailable, match="riscv64"):
        fences.install(structlog.get_logger(), machine="riscv64")


@pytest.mark.skipif(not X86, reason="x86-64 code")
def test_arm64_choice_installs_all_three(saved_barriers: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # On x86 the arm64 page cannot run: stand in this CPU's fences for the page's code.
    monkeypatch.setattr(fences, "a64_fence_code", fences.x86_fence_code)
    barrier.uninstall()
    assert fences.install(structlog.get_logger(), machine="aarch64") == "code_page"
    got = (barrier.mb, barrier.wmb, barrier.rmb)
    assert barrier._noop not in got and fences._noop not in got
    assert len({id(f) for f in got}) == 3
    barrier.mb()
    barrier.wmb()
    barrier.rmb()
