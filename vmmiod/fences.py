"""Real memory fences for vmmiod.barrier, installed once at daemon start (every adaptor).

Fences are a property of the host CPU, not of the hypervisor: the rings are shared with another
CPU whichever adaptor delivered them. Python cannot emit a fence instruction, so one is run
through ctypes, found in this order (docs/architecture.md, "Barriers"):

1. `code_page`: a page of tiny functions (`fence; ret`) written into a memfd and mapped
   read+execute, never writable+executable: systemd's MemoryDenyWriteExecute forbids W+X
   mappings and making writable memory executable, not executable file mappings (every shared
   library is one). No extra package.
2. `libatomic`: the out-of-line C11 `atomic_thread_fence(order)` of libatomic.so.1 (Debian
   package libatomic1).

What is installed:
- x86-64 (TSO: stores stay in order, loads stay in order, but a later load may pass an earlier
  store): `mb()` becomes `mfence` (libatomic: seq_cst); `wmb()` and `rmb()` stay no-ops.
  `mb()` is needed exactly at the store-then-load places of the data path (publish_used:
  used.idx then used_event; enable_notification: avail_event then avail.idx).
- arm64: `dmb ish` / `dmb ishst` / `dmb ishld` for mb / wmb / rmb (libatomic: seq_cst,
  release, acquire), the fences Linux uses for smp_mb / smp_wmb / smp_rmb.
- any other machine: nothing can be installed; the daemon refuses to start.
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
FENCE_STRIDE = 8  # bytes per function: one barrier, one return (padded with int3 on x86)

# x86-64: mfence; ret / sfence; ret / lfence; ret.
X86_MFENCE, X86_SFENCE, X86_LFENCE = b"\x0f\xae\xf0\xc3", b"\x0f\xae\xf8\xc3", b"\x0f\xae\xe8\xc3"

MEMORY_ORDER_ACQUIRE = 2
MEMORY_ORDER_RELEASE = 3
MEMORY_ORDER_SEQ_CST = 5

Fence = Callable[[], None]


class FencesUnavailable(OSError):
    """No way to issue the host CPU's fences: the daemon must not serve rings."""


_keep: list[Any] = []  # code pages and libraries stay alive for the life of the process
_installed: str | None = None  # the method, once installed


def _noop() -> None:
    return None


def arch(machine: str | None = None) -> str:
    """'x86_64', 'arm64' or the machine name as the kernel reports it."""
    m = (machine or platform.machine()).lower()
    if m in ("x86_64", "amd64"):
        return "x86_64"
    if m in ("aarch64", "arm64"):
        return "arm64"
    return m


def is_arm64(machine: str | None = None) -> bool:
    return arch(machine) == "arm64"


def a64_fence_code() -> bytes:
    """Three functions, FENCE_STRIDE bytes apart: full, write (store-store), read barrier."""
    return b"".join(struct.pack("<II", dmb, A64_RET)
                    for dmb in (A64_DMB_ISH, A64_DMB_ISHST, A64_DMB_ISHLD))


def x86_fence_code() -> bytes:
    return b"".join(f.ljust(FENCE_STRIDE, b"\xcc") for f in (X86_MFENCE, X86_SFENCE, X86_LFENCE))


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


def make_fences(machine: str | None = None,
                code: bytes | None = None) -> tuple[str, tuple[Fence, Fence, Fence]]:
    """(method, (mb, wmb, rmb)) for this CPU, each proven to run; wmb/rmb are no-ops on x86-64.

    `code` replaces the code page's contents (tests stand x86 code in for arm64's).
    Raises FencesUnavailable when there is no way.
    """
    a = arch(machine)
    if a not in ("x86_64", "arm64"):
        raise FencesUnavailable(0, f"no memory fences known for the {a} CPU (vmmiod runs on "
                                   "x86-64 and arm64)")
    page = code if code is not None else (x86_fence_code() if a == "x86_64" else a64_fence_code())
    errors = []
    makers: list[tuple[str, Callable[[], tuple[Fence, Fence, Fence]]]] = [
        ("code_page", lambda: code_page_fences(page)), ("libatomic", libatomic_fences)]
    for method, make in makers:
        try:
            mb, wmb, rmb = make()
            mb()  # prove it runs before trusting the rings to it
            wmb()
            rmb()
        except (OSError, AttributeError) as exc:
            errors.append(f"{method}: {exc}")
            continue
        if a == "x86_64":  # TSO keeps store-store and load-load order: only mb is a fence
            wmb = rmb = _noop
        return method, (mb, wmb, rmb)
    raise FencesUnavailable(0, f"no way to issue {a} memory fences (" + "; ".join(errors)
                            + "): install libatomic1")


def install(log: Any, machine: str | None = None) -> str:
    """Install the host CPU's fences into vmmiod.barrier once; returns the method used.

    Raises FencesUnavailable (the daemon exits 69 with the message).
    """
    global _installed
    if _installed is not None:
        return _installed
    method, (mb, wmb, rmb) = make_fences(machine)
    barrier.install(mb, wmb, rmb)
    _installed = method
    log.info("barriers_installed", method=method, cpu=arch(machine))
    return method
