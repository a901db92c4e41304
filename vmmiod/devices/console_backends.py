"""Host ends of virtio-console ports: the shared backend skeleton, the ring buffer, pty, file.

One backend per port. The device talks to it with non-blocking calls only:
- `write(data) -> int`: output from the guest. Takes what it can now; less than `len(data)`
  means "full": the device stops consuming that port's transmitq and the backend calls
  `listener.backend_writable()` when it can take more (back-pressure toward the guest). While no
  client is attached everything is taken into a bounded `OutputRing` (oldest bytes overwritten,
  counted, logged at most every few seconds) that is replayed, in order, to the next client.
- `write_urgent(data)`: EMERG_WRITE; never refuses (ring when the client is full or absent).
- `set_input(want)` / `read_into(views) -> int`: input from the host is watched
  (loop.add_reader) only while the device has receive buffers for it, and read straight into
  guest memory. Nothing is buffered on the host side for the guest.

The pty backend lives in console_pty.py, the socket backend in console_socket.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from vmmiod.state.store import RecordRefused, Slot

IOV_MAX = 1024  # Linux UIO_MAXIOV: the most views one readv accepts
OVERFLOW_LOG_INTERVAL = 10.0  # seconds between two console_buffer_overflow records per port
ERROR_LOG_INTERVAL = 10.0
GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.EIO, errno.ENOTCONN,
                         errno.EBADF})

Data = bytes | bytearray | memoryview


class PortListener(Protocol):
    """What a backend tells its port (implemented by the console device's Port)."""

    def backend_readable(self) -> None: ...

    def backend_writable(self) -> None: ...

    def backend_connection(self, connected: bool) -> None: ...

    def backend_resize(self, cols: int, rows: int) -> None: ...


class RateLimit:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True


class OutputRing:
    """Bounded FIFO of guest output kept while no client is attached; the oldest bytes go first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self.data = bytearray()
        self.mirror: Slot | None = None

    def attach(self, mirror: Slot) -> None:
        """Keep a copy in the state record (docs/restart.md): output held for the next client
        survives a restart of the daemon. What the last instance held comes back first."""
        try:
            kept = mirror.read() or b""
        except RecordRefused:
            kept = b""
        self.mirror = mirror
        if kept and self.capacity:
            self.data = bytearray(kept[-self.capacity:]) + self.data
            del self.data[:max(0, len(self.data) - self.capacity)]
        self._mirror()

    def _mirror(self) -> None:
        if self.mirror is not None:
            self.mirror.write(bytes(self.data))

    def __len__(self) -> int:
        return len(self.data)

    def append(self, chunk: Data) -> int:
        """Keep `chunk`; returns how many bytes (old or new) had to be dropped to stay bounded."""
        n = len(chunk)
        cap = self.capacity
        if n >= cap:
            dropped = len(self.data) + n - cap
            self.data = bytearray(chunk[n - cap:]) if cap else bytearray()
            self._mirror()
            return dropped
        over = len(self.data) + n - cap
        if over > 0:
            del self.data[:over]
        self.data += chunk
        self._mirror()
        return max(over, 0)

    def consume(self, n: int) -> None:
        del self.data[:n]
        self._mirror()


class Counters:
    """Per-port counters kept in the device's flat `counters` dict (port key and total)."""

    def __init__(self, counters: dict[str, int], port: int) -> None:
        self.counters = counters
        self.prefix = f"port{port}_"

    def add(self, name: str, n: int = 1) -> None:
        c = self.counters
        key = self.prefix + name
        c[key] = c.get(key, 0) + n
        c[name] = c.get(name, 0) + n


class PortBackend:
    """Skeleton shared by pty, socket and file: the ring, back-pressure, input watching."""

    kind = "none"
    has_input = True
    POLL_INTERVAL = 0.25  # seconds; pty window size and hang-up, idle socket client hang-up

    def __init__(self, port: int, buffer_size: int, listener: PortListener,
                 counters: Counters, log: Any) -> None:
        self.port = port
        self.listener = listener
        self.count = counters
        self.log = log
        self.ring = OutputRing(buffer_size)
        self.connected = False  # a client is attached: output flows to `fd`
        self.fd: int | None = None  # the client's fd (pty master, socket client)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._want_input = False
        self._reading = False
        self._writing = False
        self._timer: asyncio.TimerHandle | None = None
        self._overflow_limit = RateLimit(OVERFLOW_LOG_INTERVAL)
        self._overflow_unlogged = 0
        self._error_limit = RateLimit(ERROR_LOG_INTERVAL)

    # -- lifecycle (subclasses extend) ---------------------------------------------------------
    async def open(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._schedule_tick()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unwatch()

    def reopen(self) -> None:
        """SIGHUP (log rotation): only the file backend has something to reopen."""

    def _schedule_tick(self) -> None:
        if self.loop is not None:
            self._timer = self.loop.call_later(self.POLL_INTERVAL, self._on_tick)

    def _on_tick(self) -> None:
        self.tick()
        self._schedule_tick()

    def tick(self) -> None:
        """Periodic check (hang-up, window size). Subclass hook."""

    # -- output ---------------------------------------------------------------------------------
    def write(self, data: Data) -> int:
        if not self.connected:
            self._keep(data)
            return len(data)
        if self.ring:
            self._flush_ring()
            if self.ring:
                if not self.connected:
                    return self.write(data)
                self._watch_writable()
                return 0
        n = self._send(data)
        if n < 0:  # the client went away during the write: keep the rest for the next one
            return self.write(data)
        if n < len(data):
            self._watch_writable()
        return n

    def write_urgent(self, data: Data) -> None:
        n = 0
        if self.connected and not self.ring:
            n = max(self._send(data), 0)
        if n < len(data):
            self._keep(memoryview(data)[n:])
            if self.connected:
                self._watch_writable()

    def _keep(self, data: Data) -> None:
        dropped = self.ring.append(data)
        if dropped:
            self.count.add("dropped_bytes", dropped)
            self._overflow_unlogged += dropped
            if self._overflow_limit.ready():
                self.log.warning("console_buffer_overflow", port=self.port,
                                 dropped=self._overflow_unlogged, buffer=self.ring.capacity)
                self._overflow_unlogged = 0

    def _send(self, data: Data) -> int:
        """Non-blocking write to the client: bytes taken, 0 if full, -1 if the client is gone."""
        assert self.fd is not None
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in GONE_ERRNOS:
                self._client_gone(f"write: {exc.strerror}")
                return -1
            raise

    def _flush_ring(self) -> None:
        while self.ring and self.connected:
            n = self._send(self.ring.data)
            if n <= 0:
                return
            self.ring.consume(n)

    def _on_writable(self) -> None:
        self._flush_ring()
        if self.ring and self.connected:
            return  # still full: keep watching
        self._stop_writing()
        self.listener.backend_writable()

    def _watch_writable(self) -> None:
        if not self._writing and self.fd is not None and self.loop is not None:
            self.loop.add_writer(self.fd, self._on_writable)
            self._writing = True

    def _stop_writing(self) -> None:
        if self._writing and self.fd is not None and self.loop is not None:
            self.loop.remove_writer(self.fd)
        self._writing = False

    # -- input ----------------------------------------------------------------------------------
    @property
    def input_wanted(self) -> bool:
        return self._want_input

    def set_input(self, want: bool) -> None:
        self._want_input = want
        self._update_reader()

    def _input_open(self) -> bool:
        return self.connected

    def _update_reader(self) -> None:
        want = self._want_input and self.has_input and self._input_open()
        if want == self._reading or self.fd is None or self.loop is None:
            if self.fd is None:
                self._reading = False
            return
        if want:
            self.loop.add_reader(self.fd, self.listener.backend_readable)
        else:
            self.loop.remove_reader(self.fd)
        self._reading = want

    def read_into(self, views: Sequence[memoryview]) -> int:
        """Read host input straight into guest buffers: bytes read, 0 if nothing (or gone)."""
        if self.fd is None or not self._input_open():
            return 0
        try:
            n = os.readv(self.fd, views[:IOV_MAX])
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in GONE_ERRNOS:
                self._client_gone(f"read: {exc.strerror}")
                return 0
            raise
        if n == 0:
            self._input_ended()
        return n

    def _input_ended(self) -> None:
        self._client_gone("end of input")

    # -- connection state -----------------------------------------------------------------------
    def _unwatch(self) -> None:
        if self.fd is not None and self.loop is not None:
            if self._reading:
                self.loop.remove_reader(self.fd)
            if self._writing:
                self.loop.remove_writer(self.fd)
        self._reading = self._writing = False

    def _set_connected(self, connected: bool) -> None:
        if connected == self.connected:
            return
        self.connected = connected
        if connected:
            self.count.add("client_connects")
            if self.ring:
                self._watch_writable()  # replay what was kept while nobody listened
        else:
            self._unwatch()
        self._update_reader()
        self.listener.backend_connection(connected)
        if not connected:
            self.listener.backend_writable()  # blocked output can go to the ring now

    def _client_gone(self, reason: str) -> None:
        self._set_connected(False)

    def _log_error(self, event: str, **kw: Any) -> None:
        if self._error_limit.ready():
            self.log.warning(event, port=self.port, **kw)


class FileBackend(PortBackend):
    """Appends guest output to a file; no input. Reopened on SIGHUP for log rotation."""

    kind = "file"
    has_input = False

    def __init__(self, path: Path, *args: Any) -> None:
        super().__init__(*args)
        self.path = path
        self._file_fd: int | None = None

    def _open_file(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    async def open(self) -> None:
        self._file_fd = self._open_file()
        self.connected = True  # a file is always there: nothing goes to the ring
        self.loop = asyncio.get_running_loop()
        if self.ring:  # emergency writes that came before open()
            kept = bytes(self.ring.data)
            self.ring.consume(len(kept))
            self.write(kept)
        self.log.info("console_file_opened", port=self.port, path=str(self.path))

    async def close(self) -> None:
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None
        self.connected = False

    def reopen(self) -> None:
        try:
            fd = self._open_file()
        except OSError as exc:
            self._log_error("console_backend_error", op="reopen", path=str(self.path),
                            error=exc.strerror)
            return
        old, self._file_fd = self._file_fd, fd
        if old is not None:
            os.close(old)
        self.log.info("console_file_reopened", port=self.port, path=str(self.path))

    def write(self, data: Data) -> int:
        if self._file_fd is None:
            self._keep(data)  # before open(): kept, written by nobody (bounded)
            return len(data)
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):  # regular files take everything unless they fail
                done += os.write(self._file_fd, view[done:])
        except OSError as exc:  # ENOSPC, EIO: the guest must not stall on a full log disk
            self.count.add("dropped_bytes", len(view) - done)
            self._log_error("console_backend_error", op="write", path=str(self.path),
                            error=exc.strerror)
        return len(view)

    def write_urgent(self, data: Data) -> None:
        self.write(data)
