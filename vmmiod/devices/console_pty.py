"""Pseudo-terminal backend of a virtio-console port (like xenconsoled's pty + symlink).

The slave is set raw once (bytes pass untouched: the guest's own tty does the cooking) and
closed; the daemon keeps only the master. Its path is logged and a stable symlink (`link`) is
replaced atomically to point at it, so `screen`, `minicom` or a script can attach.

Attached or not: Linux reports POLLHUP on the master while no process has the slave open
(QEMU's char-pty uses the same signal). That is "no client": output then goes to the port's
ring and is replayed when someone opens the slave.

Window size: SIGWINCH is only delivered to the slave side's foreground process group, never to
the master holder, so the backend polls TIOCGWINSZ on the master every `POLL_INTERVAL` seconds
(the same tick that watches POLLHUP) and after each read. Changes go to `backend_resize()`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import termios
import tty
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmmiod.devices.console_backends import PortBackend

WINSIZE = struct.Struct("HHHH")  # struct winsize: rows, cols, xpixel, ypixel (native order)


class PtyBackend(PortBackend):
    """A pseudo-terminal; the slave's path is logged and linked from a stable path."""

    kind = "pty"

    def __init__(self, link: Path | None, winsize: tuple[int, int], *args: Any) -> None:
        super().__init__(*args)
        self.link = link
        self.path = ""
        self.cols, self.rows = winsize
        self._poll = select.poll()

    async def open(self) -> None:
        master, slave = os.openpty()
        try:
            tty.setraw(slave)  # bytes pass untouched: the guest's own tty does the cooking
            fcntl.ioctl(slave, termios.TIOCSWINSZ, WINSIZE.pack(self.rows, self.cols, 0, 0))
            self.path = os.ttyname(slave)
        finally:
            # No slave fd kept: POLLHUP on the master then means "nobody attached".
            os.close(slave)
        os.set_blocking(master, False)
        os.set_inheritable(master, False)
        self.fd = master
        self._poll.register(master, select.POLLIN)
        if self.link is not None:
            self._make_link()
        self.log.info("console_pty_ready", port=self.port, path=self.path,
                      link=str(self.link) if self.link else None)
        await super().open()
        self.tick()

    def _make_link(self) -> None:
        assert self.link is not None
        link = self.link
        if link.exists() and not link.is_symlink():
            raise OSError(errno.EEXIST, f"{link} exists and is not a symlink; not replacing it")
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(self.path, tmp)
        os.replace(tmp, link)  # atomic: a reader never sees the link missing

    async def close(self) -> None:
        await super().close()
        link = self.link
        if link is not None and link.is_symlink() and os.readlink(link) == self.path:
            link.unlink()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.connected = False

    def tick(self) -> None:
        if self.fd is None:
            return
        hung_up = any(ev & select.POLLHUP for _, ev in self._poll.poll(0))
        if hung_up == self.connected:
            self.log.info("console_client_connected" if not hung_up
                          else "console_client_disconnected", port=self.port, path=self.path)
            self._set_connected(not hung_up)
        self._check_winsize()

    def _check_winsize(self) -> None:
        assert self.fd is not None
        try:
            rows, cols, _, _ = WINSIZE.unpack(fcntl.ioctl(self.fd, termios.TIOCGWINSZ,
                                                          bytes(WINSIZE.size)))
        except OSError:
            return
        if (cols, rows) != (self.cols, self.rows) and cols and rows:
            self.cols, self.rows = cols, rows
            self.listener.backend_resize(cols, rows)

    def read_into(self, views: Sequence[memoryview]) -> int:
        n = super().read_into(views)
        if n and self.fd is not None:
            self._check_winsize()
        return n

    def _client_gone(self, reason: str) -> None:
        # EIO on the master: the last slave fd was closed (the tick would see POLLHUP too).
        if self.connected:
            self.log.info("console_client_disconnected", port=self.port, path=self.path,
                          reason=reason)
        self._set_connected(False)
