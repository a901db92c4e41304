"""The device state record: one file in the runtime directory, mapped MAP_SHARED (docs/restart.md).

A store into a shared file mapping is in the page cache at once: a daemon killed with SIGKILL
loses nothing it already stored, and the next instance maps the same bytes. Layout, all
little-endian, format version `FORMAT_VERSION`:

    header  (4096 bytes): magic "VMMIODST", u32 version, u32 windows, u32 window bytes,
            u32 layout crc, then the identity slot (which guest the record belongs to)
    window i (window bytes each): the state slot (registers, queue set-up, device state as
            JSON), one queue area per queue (vmmiod/virtqueue/record.py), then the device's
            own area (`VirtioDevice.record_bytes()`: the console keeps its output rings there)

A slot is written like a seqlock with two copies: the body goes into the copy not in use, then
its crc32 (over sequence, length and body), then the sequence number in one 8-byte store,
which commits it. A reader takes the valid copy with the highest sequence; a copy whose crc
does not match (the writer died half-way) is never trusted, and the other copy still holds the
previous state, which is the right one: state is committed before the guest can see its effect.

The file is locked (flock) by the instance that uses it; a second instance for the same guest
runs without a record.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmmiod.memory import store_u64
from vmmiod.virtqueue.record import area_size

MAGIC = b"VMMIODST"
FORMAT_VERSION = 1
STATE_NAME = "device-state.bin"
HEADER_SIZE = 4096
FIXED = struct.Struct("<8sIIII")  # magic, version, windows, window bytes, layout crc
COPY = struct.Struct("<QII")  # sequence, crc32, body length
IDENTITY_AT = 64
IDENTITY_COPY = 1024
WINDOW_COPY = 16384  # one copy of a window's state slot (JSON)
PAGE = 4096

# Format versions this code can read: version -> what it understands. Version 1 is the first;
# a later format adds its reader here and keeps this one, so an upgrade resumes the guest.
READABLE_VERSIONS = {1: "window JSON v1, queue areas v1"}


class RecordRefused(Exception):
    """The record exists but is not trusted; the message says why (logged, then ignored)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # stable: torn, version, layout, guest, identity, stale, corrupt


def state_dir(guest: str, run_dir: str | None = None) -> Path:
    """systemd's RuntimeDirectory (kept across restarts and stops by RuntimeDirectoryPreserve=yes),
    or /run/vmmiod/<guest> outside systemd."""
    base = run_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or \
        f"/run/vmmiod/{guest}"
    return Path(base)


def window_bytes(queue_sizes: Sequence[int], extra: int = 0) -> int:
    n = 2 * WINDOW_COPY + sum(area_size(s) for s in queue_sizes) + extra
    return (n + PAGE - 1) // PAGE * PAGE


def layout_crc(layout: Sequence[Sequence[int]]) -> int:
    return zlib.crc32(json.dumps([list(q) for q in layout]).encode())


class Slot:
    """A double-buffered, checksummed record of up to `copy - 16` bytes at `off` in `buf`."""

    def __init__(self, buf: memoryview, off: int, copy: int) -> None:
        self.buf, self.off, self.copy = buf, off, copy
        self.seq = 0
        found = self._best()
        if found is not None:
            self.seq = found[0]

    def _copy(self, k: int) -> tuple[int, bytes] | None:
        """(sequence, body) of copy k if it is whole, else None."""
        at = self.off + k * self.copy
        seq, crc, length = COPY.unpack_from(self.buf, at)
        if seq == 0 or length > self.copy - COPY.size:
            return None
        body = bytes(self.buf[at + COPY.size:at + COPY.size + length])
        if zlib.crc32(body, zlib.crc32(struct.pack("<QI", seq, length))) != crc:
            return None
        return seq, body

    def _best(self) -> tuple[int, bytes] | None:
        copies = [c for c in (self._copy(0), self._copy(1)) if c is not None]
        return max(copies) if copies else None

    def read(self) -> bytes | None:
        """The last committed body; None if never written. RecordRefused if both are torn."""
        best = self._best()
        if best is None:
            if any(COPY.unpack_from(self.buf, self.off + k * self.copy)[0] for k in (0, 1)):
                raise RecordRefused("torn", "both copies of a record slot fail their checksum")
            return None
        return best[1]

    def write(self, body: bytes) -> None:
        if len(body) > self.copy - COPY.size:
            raise ValueError(f"record of {len(body)} bytes does not fit a {self.copy}-byte slot")
        seq = self.seq + 1
        k = seq & 1  # alternate: the copy not holding the last commit
        at = self.off + k * self.copy
        store_u64(self.buf, at, 0)  # invalid while it is rewritten
        self.buf[at + COPY.size:at + COPY.size + len(body)] = body
        crc = zlib.crc32(body, zlib.crc32(struct.pack("<QI", seq, len(body))))
        struct.pack_into("<II", self.buf, at + 8, crc, len(body))
        store_u64(self.buf, at, seq)  # the commit
        self.seq = seq

    def clear(self) -> None:
        for k in (0, 1):
            store_u64(self.buf, self.off + k * self.copy, 0)
        self.seq = 0


class WindowRecord:
    """One window's part of the file: its state slot and its queues' areas."""

    def __init__(self, buf: memoryview, off: int, queue_sizes: Sequence[int],
                 extra: int = 0) -> None:
        self.slot = Slot(buf, off, WINDOW_COPY)
        self.queue_areas: list[memoryview] = []
        at = off + 2 * WINDOW_COPY
        for s in queue_sizes:
            self.queue_areas.append(buf[at:at + area_size(s)])
            at += area_size(s)
        self.extra = buf[at:at + extra]  # the device's own (record_bytes())
        self._last: bytes | None = None
        self.frozen = False

    def commit(self, state: dict[str, Any]) -> None:
        """Record `state` (a JSON-able dict) if it differs from the last one recorded."""
        if self.frozen:
            return
        body = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
        if body != self._last:
            self.slot.write(body)
            self._last = body

    def load(self) -> dict[str, Any] | None:
        body = self.slot.read()
        if body is None:
            return None
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise RecordRefused("corrupt", f"window state is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RecordRefused("corrupt", "window state is not an object")
        self._last = body
        return data


class StateStore:
    """The open, locked, mapped record file of one daemon."""

    def __init__(self, path: Path, guest: str, layout: Sequence[Sequence[int]],
                 extras: Sequence[int] = ()) -> None:
        self.path = path
        self.guest = guest
        self.layout = [list(q) for q in layout]  # queue max sizes per window, in bus order
        self.extras = list(extras) or [0] * len(self.layout)  # device area bytes per window
        self.fd = -1
        self.map: mmap.mmap | None = None
        self.buf = memoryview(b"")
        self.windows: list[WindowRecord] = []
        self.identity: Slot | None = None
        self.refused: RecordRefused | None = None  # why the file's content was not kept
        self.frozen = False

    def open(self) -> None:
        """Open (or create) and lock the file; an unusable old content is re-initialised.

        Raises OSError (no directory, locked by another instance).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            wbytes = max((window_bytes(q, x) for q, x in zip(self.layout, self.extras)),
                         default=PAGE)
            size = HEADER_SIZE + wbytes * len(self.layout)
            old = os.fstat(fd).st_size
            try:
                self._check_header(fd, old, wbytes)
            except RecordRefused as exc:
                self.refused = exc
                os.ftruncate(fd, 0)
                old = 0
            if old != size:
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.buf = memoryview(self.map)
        if old == 0:
            FIXED.pack_into(self.buf, 0, MAGIC, FORMAT_VERSION, len(self.layout), wbytes,
                            self._layout_crc())
        self.identity = Slot(self.buf, IDENTITY_AT, IDENTITY_COPY)
        self.windows = [WindowRecord(self.buf, HEADER_SIZE + i * wbytes, q, x)
                        for i, (q, x) in enumerate(zip(self.layout, self.extras))]

    def _layout_crc(self) -> int:
        return layout_crc([[*q, x] for q, x in zip(self.layout, self.extras)])

    def _check_header(self, fd: int, size: int, wbytes: int) -> None:
        if size == 0:
            return
        head = os.pread(fd, FIXED.size, 0)
        if len(head) < FIXED.size:
            raise RecordRefused("corrupt", f"record file of {size} bytes has no header")
        magic, version, nwin, wb, crc = FIXED.unpack(head)
        if magic != MAGIC:
            raise RecordRefused("corrupt", f"not a vmmiod state record (magic {magic!r})")
        if version not in READABLE_VERSIONS:
            raise RecordRefused(
                "version", f"record format version {version} cannot be read by this vmmiod "
                f"(it reads {sorted(READABLE_VERSIONS)}): written by a "
                f"{'newer' if version > FORMAT_VERSION else 'older'} vmmiod")
        if nwin != len(self.layout) or wb != wbytes or crc != self._layout_crc():
            raise RecordRefused("layout", "the record's windows and queues differ from this "
                                "configuration (devices added, removed or resized)")

    # -- identity ------------------------------------------------------------------------------
    def previous_identity(self) -> dict[str, Any] | None:
        assert self.identity is not None
        body = self.identity.read()
        if body is None:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            raise RecordRefused("corrupt", "identity is not JSON") from None
        return data if isinstance(data, dict) else None

    def check_identity(self, identity: str) -> None:
        """RecordRefused unless the record was written for this guest and this connection."""
        prev = self.previous_identity()
        if prev is None:
            raise RecordRefused("empty", "no device state recorded")
        if prev.get("guest") != self.guest:
            raise RecordRefused("guest", f"record of guest {prev.get('guest')!r}, "
                                f"not {self.guest!r}")
        if prev.get("identity") != identity:
            raise RecordRefused("identity", f"record of {prev.get('identity')!r}; this guest "
                                f"is {identity!r} (a new guest, not the one recorded)")

    def set_identity(self, identity: str | None) -> None:
        assert self.identity is not None
        if self.frozen:
            return
        if identity is None:
            self.identity.clear()
        else:
            self.identity.write(json.dumps({"guest": self.guest, "identity": identity,
                                            "format": FORMAT_VERSION}).encode())

    # -- lifecycle ----------------------------------------------------------------------------
    def freeze(self) -> None:
        """Stop recording: what the daemon does from here (its orderly stop resets devices)
        is not the guest's state; the next instance resumes from what is recorded now."""
        self.frozen = True
        for w in self.windows:
            w.frozen = True

    def discard(self) -> None:
        """The guest is gone: nothing to resume."""
        if self.identity is not None and not self.frozen:
            self.identity.clear()

    def close(self) -> None:
        self.windows = []
        self.identity = None
        try:
            self.buf.release()
            if self.map is not None:
                self.map.close()
        except BufferError:  # a queue still holds its area: the mapping goes with the last view
            pass
        self.map = None
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # a mapping left alive would keep it
            os.close(self.fd)
            self.fd = -1
