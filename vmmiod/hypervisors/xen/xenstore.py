"""xenstore through libxenstore.so.4: read, write, directory, watches, and the backend entries
the toolstack writes for virtio devices.

xl (libxl) writes, for `disk = [...specification=virtio...]` (Xen >= 4.17):
  /local/domain/<be>/backend/virtio_disk/<domid>/<devid>/{base (decimal), irq, state, frontend,
  frontend-id, ...}
and for `virtio = [...]` (Xen >= 4.18):
  /local/domain/<be>/backend/virtio/<domid>/<devid>/{base (hex), irq, type, grant_usage, ...}
then waits for `state` = InitWait (2) on create and Closed (6) after it writes Closing (5) on
destroy. Values written there are the toolstack's, but every number is still parsed defensively.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from vmmiod.hypervisors.xen.abi import XBT_NULL, XS_WATCH_PATH, XS_WATCH_TOKEN
from vmmiod.hypervisors.xen.libs import XenLibs

BACKEND_KINDS = ("virtio_disk", "virtio")  # xl allots disks first, then generic devices
MAX_DIRECTORY = 4096  # entries we accept from one directory listing
HEX_DIGITS = frozenset("0123456789abcdef")


class XenStoreError(OSError):
    pass


class XenStore:
    """One connection to xenstored."""

    def __init__(self, libs: XenLibs) -> None:
        self._lib = libs.store
        self._libc = libs.libc
        self.handle: int = self._lib.xs_open(0) or 0
        if not self.handle:
            err = ctypes.get_errno()
            raise XenStoreError(err, "xs_open: cannot connect to xenstored")

    def _h(self) -> int:
        # libxenstore dereferences its handle unchecked: a closed one must never reach it.
        if not self.handle:
            raise XenStoreError(9, "xenstore connection is closed")  # EBADF
        return self.handle

    def read(self, path: str) -> str | None:
        n = ctypes.c_uint(0)
        p = self._lib.xs_read(self._h(), XBT_NULL, path.encode(), ctypes.byref(n))
        if not p:
            return None
        try:
            return ctypes.string_at(p, n.value).decode("utf-8", "replace")
        finally:
            self._libc.free(p)

    def write(self, path: str, value: str) -> None:
        data = value.encode()
        if not self._lib.xs_write(self._h(), XBT_NULL, path.encode(), data, len(data)):
            raise XenStoreError(ctypes.get_errno(), f"xs_write {path}")

    def directory(self, path: str) -> list[str]:
        n = ctypes.c_uint(0)
        p = self._lib.xs_directory(self._h(), XBT_NULL, path.encode(), ctypes.byref(n))
        if not p:
            return []
        try:
            arr = ctypes.cast(p, ctypes.POINTER(ctypes.c_char_p))
            return [arr[i].decode("utf-8", "replace") for i in range(min(n.value, MAX_DIRECTORY))
                    if arr[i] is not None]
        finally:
            self._libc.free(p)  # one allocation holds the array and the strings

    def watch(self, path: str, token: str) -> None:
        if not self._lib.xs_watch(self._h(), path.encode(), token.encode()):
            raise XenStoreError(ctypes.get_errno(), f"xs_watch {path}")

    def unwatch(self, path: str, token: str) -> None:
        self._lib.xs_unwatch(self._h(), path.encode(), token.encode())

    def fileno(self) -> int:
        fd: int = self._lib.xs_fileno(self._h())
        if fd < 0:
            raise XenStoreError(ctypes.get_errno(), "xs_fileno")
        return fd

    def check_watch(self) -> tuple[str, str] | None:
        """The next fired watch as (path, token), or None (never blocks)."""
        p = self._lib.xs_check_watch(self._h())
        if not p:
            return None
        try:
            arr = ctypes.cast(p, ctypes.POINTER(ctypes.c_char_p))
            path = (arr[XS_WATCH_PATH] or b"").decode("utf-8", "replace")
            token = (arr[XS_WATCH_TOKEN] or b"").decode("utf-8", "replace")
            return path, token
        finally:
            self._libc.free(p)

    def domain_introduced(self, domid: int) -> bool:
        return bool(self._lib.xs_is_domain_introduced(self._h(), domid))

    def close(self) -> None:
        if self.handle:
            self._lib.xs_close(self.handle)
            self.handle = 0


# -- parsing ---------------------------------------------------------------------------------------
def parse_number(text: str | None, hex_default: bool = False) -> int | None:
    """A xenstore number, base auto-detected: `base` is written "%#x" under backend/virtio and
    "%u" under backend/virtio_disk. A 0x prefix means hex; digits alone are decimal unless the
    key is known to be hex (`hex_default`); hex letters without a prefix mean hex."""
    if text is None:
        return None
    s = text.strip().lower()
    if not s or len(s) > 24:
        return None
    prefixed = s.startswith("0x")
    digits = s.removeprefix("0x")
    if not digits or any(c not in HEX_DIGITS for c in digits):
        return None  # no sign, no underscores, no whitespace inside: int() would take those
    if not prefixed and s.isdigit() and not hex_default:
        return int(s, 10)
    return int(digits, 16)


@dataclass(frozen=True)
class BackendEntry:
    """One virtio backend entry the toolstack created for our guest."""

    kind: str  # "virtio_disk" or "virtio"
    devid: int
    path: str  # /local/domain/<be>/backend/<kind>/<domid>/<devid>
    base: int
    irq: int
    frontend_id: int | None
    frontend: str | None
    grant_usage: bool | None  # None: key absent
    state: int | None


def backend_root(backend_domid: int, kind: str, domid: int) -> str:
    return f"/local/domain/{backend_domid}/backend/{kind}/{domid}"


def read_backend_entries(xs: XenStore, backend_domid: int, domid: int,
                         log: Any = None) -> list[BackendEntry]:
    """Every usable virtio backend entry for `domid`, in the order xl allotted them (by base)."""
    out: list[BackendEntry] = []
    for kind in BACKEND_KINDS:
        root = backend_root(backend_domid, kind, domid)
        for name in xs.directory(root):
            devid = parse_number(name) if name.isdigit() else None
            path = f"{root}/{name}"
            base = parse_number(xs.read(f"{path}/base"), hex_default=kind == "virtio")
            irq = parse_number(xs.read(f"{path}/irq"))
            if devid is None or base is None or irq is None:
                if log is not None:
                    # xl removes an entry key by key on destroy (`state` first): an entry
                    # without a state, or past Closing, is one going away, not a bad one.
                    state = parse_number(xs.read(f"{path}/state"))
                    emit = log.debug if state is None or state >= 5 else log.warning
                    emit("xen_backend_entry_invalid", path=path, base_present=base is not None,
                         irq_present=irq is not None, state=state)
                continue
            gu = parse_number(xs.read(f"{path}/grant_usage"))
            out.append(BackendEntry(
                kind=kind, devid=devid, path=path, base=base, irq=irq,
                frontend_id=parse_number(xs.read(f"{path}/frontend-id")),
                frontend=xs.read(f"{path}/frontend"),
                grant_usage=None if gu is None else bool(gu),
                state=parse_number(xs.read(f"{path}/state"))))
    out.sort(key=lambda e: e.base)
    return out


def entry_problems(entry: BackendEntry, domid: int) -> list[str]:
    """The frontend-id / devid pairing the toolstack promises, checked."""
    problems = []
    if entry.frontend_id is not None and entry.frontend_id != domid:
        problems.append(f"{entry.path}/frontend-id is {entry.frontend_id}, not {domid}")
    if entry.frontend is not None:
        want = f"/local/domain/{domid}/device/{entry.kind}/{entry.devid}"
        if entry.frontend != want:
            problems.append(f"{entry.path}/frontend is {entry.frontend!r}, expected {want!r}")
    return problems


def find_domids_by_name(xs: XenStore, name: str) -> list[int]:
    """Every domid whose /local/domain/<domid>/name is `name` (during a reboot the dying domain
    and the new one can both carry it)."""
    out = []
    for d in xs.directory("/local/domain"):
        if d.isdigit() and xs.read(f"/local/domain/{d}/name") == name:
            out.append(int(d))
    return out


def find_domid_by_name(xs: XenStore, name: str) -> int | None:
    found = find_domids_by_name(xs, name)
    return max(found) if found else None
