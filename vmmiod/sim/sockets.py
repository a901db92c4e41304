"""Client-side Unix-socket helpers shared by the simulated guest's tools, the benchmarks and
the tests: connecting to a daemon's socket that may not be listening yet."""

from __future__ import annotations

import socket
import time


def connect_unix(path: str, timeout: float = 10.0) -> socket.socket:
    """Connect to the stream socket at `path`, retrying while it does not exist or refuses
    (the daemon is still starting) until `timeout` seconds pass; the socket keeps `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.settimeout(timeout)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
