"""Real memory barriers for arm64, installed into vmmiod.barrier.

Python cannot emit `dmb`. Two ways to run one, tried in this order (docs/xen.md explains why):

1. `code_page`: a page holding three two-instruction functions (`dmb ish; ret`,
   `dmb ishst; ret`, `dmb ishld; ret`) written into a memfd and mapped read+execute, never
   writable+executable: systemd's MemoryDenyWriteExecute forbids W+X mappings and making
   writable memory executable, not executable file mappings (every shared library is one).
   No extra package, and exactly the fences Linux uses for smp_mb/smp_wmb/smp_rmb.
2. `libatomic`: the out-of-line C11 `atomic_thread_fence(order)` of libatomic.so.1 (Debian
   package libatomic1): seq_cst and release compile to `dmb ish`, acquire to `dmb ishld`.

On x86-64 stores and loads are each kept in order by the hardware (TSO) and CPython executes
every store as it runs, so the barrier module's no-ops are correct and nothing is installed.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
from collections.abc import Callable
from typing import Any

from vmmiod import barrier

# A64 encodings: DMB is 0xd50330bf | CRm << 8 (CRm 0b1011 ISH, 0b1010 ISHST, 0b1001 ISHLD).
A64_DMB_ISH = 0xD5033BBF
A64_DMB_ISHST = 0xD5033ABF
A64_DMB_ISHLD = 0xD50339BF
A64_RET = 0xD65F03C0
FENCE_STRIDE = 8  # bytes per function: one barrier, one return

# x86-64 equivalents (mfence/sfence/lfence; ret), only so the mechanism can be tested on x86.
X86_FENCES = (b"\x0f\xae\xf0\xc3", b"\x0f\xae\xf8\xc3", b"\x0f\xae\xe8\xc3")

MEMORY_ORDER_ACQUIRE = 2
MEMORY_ORDER_RELEASE = 3
MEMORY_ORDER_SEQ_CST = 5

Fence = Callable[[], None]

_keep: list[Any] = []  # code pages and libraries stay alive for the life of the process


def a64_fence_code() -> bytes:
    """Three functions, FENCE_STRIDE bytes apart: full, write (store-store), read barrier."""
    return b"".join(struct.pack("<II", dmb, A64_RET)
                    for dmb in (A64_DMB_ISH, A64_DMB_ISHST, A64_DMB_ISHLD))


def x86_fence_code() -> bytes:
    return b"".join(f.ljust(FENCE_STRIDE, b"\xcc") for f in X86_FENCES)


def code_page_fences(code: bytes) -> tuple[Fence, Fence, Fence]:
    """Map `code` read+execute from a memfd and return its three functions (mb, wmb, rmb)."""
    fd = os.memfd_create("vmmiod-fences", os.MFD_CLOEXEC)
    try:
        os.write(fd, code.ljust(mmap.PAGESIZE, b"\0"))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        addr = libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_SHARED,
                         fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of the fence page: {os.strerror(err)}")
    finally:
        os.close(fd)
    proto = ctypes.CFUNCTYPE(None)
    fns = tuple(proto(addr + i * FENCE_STRIDE) for i in range(3))
    _keep.append(fns)
    return fns[0], fns[1], fns[2]


def libatomic_fences(soname: str = "libatomic.so.1") -> tuple[Fence, Fence, Fence]:
    lib = ctypes.CDLL(soname)
    fence = lib.atomic_thread_fence
    fence.argtypes = [ctypes.c_int]
    fence.restype = None
    _keep.append(lib)
    return (lambda: fence(MEMORY_ORDER_SEQ_CST), lambda: fence(MEMORY_ORDER_RELEASE),
            lambda: fence(MEMORY_ORDER_ACQUIRE))


def needs_fences(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("aarch64", "arm64")


def install_fences(log: Any, machine: str | None = None) -> str:
    """Install real barriers on arm64. Returns the method used ("tso" when none is needed).

    Raises OSError when arm64 has neither way (the caller reports PlatformUnavailable).
    """
    if not needs_fences(machine):
        log.info("xen_barriers", method="tso")
        return "tso"
    errors = []
    makers: list[tuple[str, Callable[[], tuple[Fence, Fence, Fence]]]] = [
        ("code_page", lambda: code_page_fences(a64_fence_code())),
        ("libatomic", libatomic_fences)]
    for method, make in makers:
        try:
            mb, wmb, rmb = make()
            mb()  # prove it runs before trusting it with the ioreq page
            barrier.install(mb, wmb, rmb)
            log.info("xen_barriers", method=method)
            return method
        except (OSError, AttributeError) as exc:
            errors.append(f"{method}: {exc}")
    raise OSError(0, "no way to issue arm64 memory barriers (" + "; ".join(errors)
                  + "): install libatomic1")
