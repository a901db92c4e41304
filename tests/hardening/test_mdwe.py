"""The daemon under MemoryDenyWriteExecute=yes, which both systemd units set: applied the two
ways systemd applies it (tests/hardening/mdwe.py: the kernel's PR_SET_MDWE, systemd >= 254 on
Linux >= 6.3; the seccomp filter of systemd 252, Debian 12), it installs its fences from the
read+execute code page (vmmiod/fences.py) and serves all three devices. The probe shows the
restriction is in force: a writable+executable mapping and making a page executable fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hardening.daemon_guest import write_guest
from tests.hardening.test_privilege import serves, start
from vmmiod.sim.harness import GuestFiles
from vmmiod.sim.net import udp_peer

MDWE = Path(__file__).with_name("mdwe.py")
MODES = ("kernel", "seccomp")
PROBE = r"""
import ctypes, mmap, types
from vmmiod import barrier, fences
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("wx=allowed")
except OSError:
    print("wx=refused")
page = mmap.mmap(-1, 4096)
libc = ctypes.CDLL(None, use_errno=True)
addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
print("mprotect_exec=" + ("refused" if libc.mprotect(ctypes.c_void_p(addr), 4096, 5) else "allowed"))
fences.install(types.SimpleNamespace(info=lambda *a, **k: None))
barrier.mb(); barrier.wmb(); barrier.rmb()
print("fences=" + str(fences._installed))
"""


def under_mdwe(mode: str, *cmd: str) -> list[str]:
    return [sys.executable, str(MDWE), mode, *cmd]


def applicable(mode: str) -> None:
    run = subprocess.run(under_mdwe(mode, "true"), capture_output=True, text=True, timeout=30)
    if run.returncode == 77:
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("mode", MODES)
def test_fence_code_page_works_under_mdwe(mode: str) -> None:
    applicable(mode)
    run = subprocess.run(under_mdwe(mode, sys.executable, "-c", PROBE), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["wx=refused", "mprotect_exec=refused", "fences=code_page"]


@pytest.mark.parametrize("mode", MODES)
def test_daemon_serves_under_mdwe(mode: str, tmp_path: Path) -> None:
    applicable(mode)
    files = GuestFiles(tmp_path)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    peer = udp_peer()
    write_guest(files, image, net_port=peer.getsockname()[1])
    d = start(files, under_mdwe(mode))
    try:
        if mode == "seccomp":
            with open(f"/proc/{d.pid}/status") as f:
                assert "Seccomp:\t2" in f.read()  # the filter is on the daemon itself
        serves(files)
        assert d.stop() == 0
    finally:
        d.kill()
        peer.close()
    events = [json.loads(x) for x in files.log.read_text().splitlines() if x.startswith("{")]
    fences = [e for e in events if e.get("event") == "barriers_installed"]
    assert fences and fences[0]["method"] == "code_page"
