"""Run a command under MemoryDenyWriteExecute, as systemd applies it:

- `kernel`: prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), which systemd >= 254 uses on Linux
  >= 6.3: no mapping may be writable and executable, none may become executable later;
- `seccomp`: the filter of systemd 252 (Debian 12) and of later ones on older kernels:
  mmap() with PROT_WRITE|PROT_EXEC, mprotect()/pkey_mprotect() with PROT_EXEC and shmat() with
  SHM_EXEC fail with EPERM.

Both are inherited across fork and execve. Usage: mdwe.py kernel|seccomp COMMAND [ARG...]
(exit 77 when this kernel cannot apply that mode).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 22, 38, 65, 1
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
# (audit arch, mmap, mprotect, pkey_mprotect, shmat)
SYSCALLS = {"x86_64": (0xC000003E, 9, 10, 329, 30),
            "aarch64": (0xC00000B7, 222, 226, 288, 196)}
LD_W_ABS, JEQ_K, AND_K, RET_K = 0x20, 0x15, 0x54, 0x06
NR, ARCH, ARG2 = 0, 4, 32  # offsets in struct seccomp_data (args[2], low 32 bits)


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_program(machine: str) -> bytes:
    audit_arch, mmap_nr, mprotect_nr, pkey_nr, shmat_nr = SYSCALLS[machine]
    # (code, jump-if-true label, jump-if-false label, k); labels resolved below.
    prog: list[tuple[int, str | None, str | None, int] | str] = [
        (LD_W_ABS, None, None, ARCH), (JEQ_K, None, "allow", audit_arch),
        (LD_W_ABS, None, None, NR),
        (JEQ_K, "mmap", None, mmap_nr), (JEQ_K, "exec", None, mprotect_nr),
        (JEQ_K, "exec", None, pkey_nr), (JEQ_K, "shm", "allow", shmat_nr),
        "mmap", (LD_W_ABS, None, None, ARG2), (AND_K, None, None, PROT_WRITE | PROT_EXEC),
        (JEQ_K, "deny", "allow", PROT_WRITE | PROT_EXEC),
        "exec", (LD_W_ABS, None, None, ARG2), (AND_K, None, None, PROT_EXEC),
        (JEQ_K, "deny", "allow", PROT_EXEC),
        "shm", (LD_W_ABS, None, None, ARG2), (AND_K, None, None, SHM_EXEC),
        (JEQ_K, "deny", "allow", SHM_EXEC),
        "allow", (RET_K, None, None, SECCOMP_RET_ALLOW),
        "deny", (RET_K, None, None, SECCOMP_RET_ERRNO | errno.EPERM)]
    labels: dict[str, int] = {}
    insns = []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = b""
    for i, (code, jt, jf, k) in enumerate(insns):
        out += struct.pack("=HBBI", code, labels[jt] - i - 1 if jt else 0,
                           labels[jf] - i - 1 if jf else 0, k)
    return out


def apply(mode: str) -> None:
    """MemoryDenyWriteExecute for this process and what it runs; OSError when impossible."""
    libc = ctypes.CDLL(None, use_errno=True)
    if mode == "kernel":
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_MDWE")
        return
    machine = platform.machine()
    if machine not in SYSCALLS:
        raise OSError(errno.ENOTSUP, f"no seccomp filter written for {machine}")
    code = seccomp_program(machine)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = SockFprog(len(code) // 8, ctypes.addressof(buf))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter")


def main() -> None:
    try:
        apply(sys.argv[1])
    except OSError as exc:
        print(f"mdwe.py: cannot apply {sys.argv[1]}: {exc}", file=sys.stderr)
        raise SystemExit(77) from None
    os.execvp(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
