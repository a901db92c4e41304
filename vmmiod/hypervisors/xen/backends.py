"""The toolstack's virtio backend entries: pairing them with the config, and their state.

Pairing: a device with an explicit `mmio.base` serves the entry at that base (the irq must agree);
devices with `mmio: auto` take the remaining entries in declaration order, which is the order
of their bases (xl allots windows upward, disks first). Each entry must name our guest as its
frontend (frontend-id, and frontend = /local/domain/<domid>/device/<kind>/<devid>).

State: xl waits for `state` = InitWait (2) after creating an entry and for Closed (6) after it
writes Closing (5) on destroy. InitWait is written once the IOREQ server is enabled (`serving`),
not at discovery: xl unpauses a rebooted guest as soon as its devices reach InitWait, and an
access to a window no enabled server claims is a data abort in an Arm guest. It is never
followed by Connected (4): libxl waits for exactly 2, and a 4 written before its watch reads the
key would make it time out. On stop, Closed is written to entries that still exist
(writing to a removed entry would recreate it).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from vmmiod.hypervisors.xen.abi import (
    XENBUS_STATE_CLOSED,
    XENBUS_STATE_CLOSING,
    XENBUS_STATE_INITIALISING,
    XENBUS_STATE_INITWAIT,
)
from vmmiod.hypervisors.xen.xenstore import (
    BACKEND_KINDS,
    BackendEntry,
    XenStore,
    XenStoreError,
    backend_root,
    entry_problems,
    parse_number,
    read_backend_entries,
)

RELEASE_TOKEN = "vmmiod-release"
BACKEND_TOKEN = "vmmiod-backend"
MAX_WATCH_EVENTS = 1024  # per wake-up; the fd stays readable when more are queued


class MismatchError(ValueError):
    """The toolstack's entries and the config cannot be paired."""


class Backends:
    def __init__(self, xs: XenStore, backend_domid: int, domid: int, devices: Sequence[Any],
                 log: Any) -> None:
        self.xs = xs
        self.backend_domid = backend_domid
        self.domid = domid
        self.log = log
        self._explicit = {d.mmio.base: d for d in devices if not d.mmio.auto}
        self._auto = [d for d in devices if d.mmio.auto]
        self.assigned: dict[str, BackendEntry] = {}  # auto device id -> entry
        self._served_paths: set[str] = set()
        self._closed_paths: set[str] = set()  # reached Closing: never InitWait again
        self._warned: set[str] = set()
        self._entries: list[BackendEntry] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._on_release: Callable[[], None] | None = None
        self.state_writes = 0
        self._require_all = False
        self.serving = False  # set by the adaptor once the IOREQ server is enabled

    # -- pairing ----------------------------------------------------------------------------------
    def discover(self, require_all: bool = False) -> bool:
        """Pair entries with the config. False: not every auto device has an entry yet (with
        `require_all`, not every explicit window either)."""
        self._entries = entries = read_backend_entries(self.xs, self.backend_domid, self.domid,
                                                       self.log)
        self._require_all = require_all
        if require_all and set(self._explicit) - {e.base for e in entries}:
            return False
        free = []
        for e in entries:
            dev = self._explicit.get(e.base)
            if dev is None:
                free.append(e)
            elif dev.mmio.irq != e.irq:
                raise MismatchError(
                    f"device {dev.id!r} is configured at {e.base:#x} irq {dev.mmio.irq}, but "
                    f"the toolstack gave that window irq {e.irq} ({e.path})")
        if len(free) < len(self._auto):
            return False
        for dev, e in zip(self._auto, free):
            self.assigned[dev.id] = e
        for e in entries:
            if e.base in self._explicit or e in self.assigned.values():
                problems = entry_problems(e, self.domid)
                if problems:
                    raise MismatchError("; ".join(problems))
                self._served_paths.add(e.path)
            elif e.path not in self._warned:
                self._warned.add(e.path)
                self.log.warning("xen_backend_unserved", path=e.path, base=hex(e.base),
                                 irq=e.irq)
        self.sync(entries)
        return True

    def early_entries(self) -> list[BackendEntry]:
        """While the toolstack is still writing entries (discover() said False): those already
        certain to be served, checked: an explicit window's (its irq was checked by discover())
        and the first free ones, one per auto device. They count as served from now on."""
        out = []
        free = 0
        for e in self._entries:
            if e.base not in self._explicit:
                if free >= len(self._auto):
                    continue
                free += 1
            problems = entry_problems(e, self.domid)
            if problems:
                raise MismatchError("; ".join(problems))
            self._served_paths.add(e.path)
            out.append(e)
        return out

    def missing_ids(self) -> list[str]:
        have = {e.base for e in self._entries} if self._require_all else set(self._explicit)
        return ([d.id for b, d in self._explicit.items() if b not in have]
                + [d.id for d in self._auto[len(self._free_entries()):]])

    def _free_entries(self) -> list[BackendEntry]:
        return [e for e in self._entries if e.base not in self._explicit]

    def missing_message(self) -> str:
        have_bases = {e.base for e in self._entries}
        missing = [f"{d.id!r} at {b:#x}" for b, d in self._explicit.items()
                   if self._require_all and b not in have_bases]
        if missing:
            return (f"the toolstack declared no virtio device for {', '.join(missing)}: the "
                    "guest's xl config must declare a virtio disk (or device) for every "
                    "window (vmmiod check prints the lines)")
        have = len(self._free_entries())
        roots = " and ".join(backend_root(self.backend_domid, k, self.domid)
                             for k in BACKEND_KINDS)
        return (f"{len(self._auto)} device(s) have 'mmio: auto' but the toolstack declared "
                f"{have} free virtio backend entr{'y' if have == 1 else 'ies'} under {roots}: "
                "declare one per device in the guest's xl config (disk = [\"backendtype="
                "standalone, specification=virtio, ...\"] or virtio = [...])")

    def auto_windows(self) -> list[tuple[str, int, int]]:
        return [(d.id, self.assigned[d.id].base, self.assigned[d.id].irq)
                for d in self._auto if d.id in self.assigned]

    def grant_usage(self) -> bool | None:
        """The entries' grant_usage (absent = 0); None when they disagree."""
        served = [e for e in self._entries if e.path in self._served_paths]
        values = {bool(e.grant_usage) for e in served}
        if len(values) > 1:
            return None
        return values.pop() if values else False

    # -- state ------------------------------------------------------------------------------------
    def sync(self, entries: list[BackendEntry] | None = None) -> None:
        """Answer the toolstack: InitWait for new entries we serve, Closed after Closing.

        Only a state the toolstack wrote is answered: an entry being removed loses its keys,
        and writing to it would recreate them. An entry that reached Closing is never moved
        back to InitWait.
        """
        if entries is None:
            entries = read_backend_entries(self.xs, self.backend_domid, self.domid, self.log)
        for e in entries:
            if e.path not in self._served_paths and e.base not in self._explicit:
                continue
            self._served_paths.add(e.path)
            if e.state == XENBUS_STATE_CLOSING:
                self._closed_paths.add(e.path)
                self._write_state(e.path, XENBUS_STATE_CLOSED)
            elif (self.serving and e.state == XENBUS_STATE_INITIALISING
                    and e.path not in self._closed_paths):
                self._write_state(e.path, XENBUS_STATE_INITWAIT)

    def sync_known(self) -> None:
        """sync() for the entries discover() found, re-reading only their `state` (the quick
        way to InitWait once the server is enabled: libxl's 10 s are running); the backend
        watch catches up on anything else."""
        fresh = [dataclasses.replace(e, state=parse_number(self.xs.read(f"{e.path}/state")))
                 for e in self._entries]
        self.sync(fresh)

    def _write_state(self, path: str, state: int) -> None:
        try:
            self.xs.write(f"{path}/state", str(state))
            self.state_writes += 1
            self.log.info("xen_backend_state", path=path, state=state)
        except XenStoreError as exc:
            self.log.warning("xen_backend_state_failed", path=path, state=state, error=str(exc))

    def close(self) -> None:
        """Closed for every entry we served that still exists, then the connection goes."""
        self._stop_reading()
        try:
            for path in sorted(self._served_paths):
                state = parse_number(self.xs.read(f"{path}/state"))
                if state is not None and state != XENBUS_STATE_CLOSED:
                    self._write_state(path, XENBUS_STATE_CLOSED)
        except XenStoreError as exc:
            self.log.warning("xen_backend_state_failed", error=str(exc))
        self.xs.close()

    # -- watches ----------------------------------------------------------------------------------
    def watch(self, loop: asyncio.AbstractEventLoop, on_release: Callable[[], None]) -> None:
        self._loop = loop
        self._on_release = on_release
        self.xs.watch("@releaseDomain", RELEASE_TOKEN)
        for kind in BACKEND_KINDS:
            self.xs.watch(backend_root(self.backend_domid, kind, self.domid), BACKEND_TOKEN)
        self._fd = self.xs.fileno()
        loop.add_reader(self._fd, self._on_watch_fd)

    def _stop_reading(self) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        self._fd = None

    def suspend_watch(self) -> None:
        """Stop reading watches and close the connection (before restricting handles)."""
        self._stop_reading()
        self.xs.close()

    def resume_watch(self, xs: XenStore, loop: asyncio.AbstractEventLoop,
                     on_release: Callable[[], None]) -> None:
        """Watch again on a new connection; registering fires every watch once, which catches
        up on whatever happened while none was registered."""
        self.xs = xs
        self.watch(loop, on_release)

    def _on_watch_fd(self) -> None:
        backend = release = False
        for _ in range(MAX_WATCH_EVENTS):
            try:
                ev = self.xs.check_watch()
            except XenStoreError:
                return
            if ev is None:
                break
            _path, token = ev
            backend |= token == BACKEND_TOKEN
            release |= token == RELEASE_TOKEN
        if backend:
            try:
                self.sync()
            except XenStoreError as exc:
                self.log.warning("xen_backend_state_failed", error=str(exc))
        if release and self._on_release is not None:
            self._on_release()
