"""The systemd notify protocol (sd_notify(3)) and watchdog, with the standard library only.

A notification is one datagram of newline-separated `KEY=value` fields sent to the AF_UNIX
socket named by $NOTIFY_SOCKET: a path, or an abstract name written with a leading '@'.
Without $NOTIFY_SOCKET (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from typing import Any

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None, log: Any = None) -> None:
        env = os.environ if env is None else env
        self.log = log
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = _watchdog_usec(env)
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None
        self._unsupported = bool(env.get("NOTIFY_SOCKET")) and self.address is None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send one datagram; never blocks and never raises (systemd may be gone)."""
        if self.address is None:
            if self._unsupported and self.log is not None:
                self._unsupported = False
                self.log.warning("notify_socket_unsupported",
                                 reason="only AF_UNIX NOTIFY_SOCKET addresses are supported")
            return False
        data = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            self.failed += 1
            if self.log is not None:
                self.log.warning("notify_failed", error=exc.strerror or str(exc),
                                 fields=list(fields))
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY, *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING, *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of WatchdogSec (sd_watchdog_enabled(3))."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    async def watchdog_loop(self) -> None:
        """Ping while the event loop runs; a stuck loop stops the pings and systemd restarts us."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str | bytes | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    return None  # unset, or a vsock:CID:PORT address (not supported here)


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (sd_watchdog_enabled(3))
    return usec if usec > 0 else None
