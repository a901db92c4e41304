"""Taking over a Unix socket path at start-up: a stale socket file (left by a daemon that died)
is removed; anything else at the path is left alone and the caller refuses to start.

Shared by every socket the daemon binds: the generic channel's, each vhost-user device's, a
console `socket` backend's and a dgram backend's own address.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path


def clear_stale_socket(path: str | Path, sock_type: int = socket.SOCK_STREAM) -> None:
    """Unlink `path` if it is a socket nobody serves; return if nothing is there.

    Raises FileExistsError (errno EEXIST) when the path is not a socket, and (errno EADDRINUSE)
    when a process still serves it: a connection is accepted or waits in a full backlog, or the
    probe fails other than with ECONNREFUSED (a socket of another type, no permission), since
    only a refused connection proves the socket is dead. `sock_type` is the type the caller binds.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket; it was left "
                              "alone: remove it or choose another socket path")
    probe = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)  # nobody serves it: left over by a daemon that died
        return
    except FileNotFoundError:
        return  # gone meanwhile
    except OSError as exc:
        reason = "a process still serves it" if isinstance(exc, BlockingIOError) else exc.strerror
        raise FileExistsError(errno.EADDRINUSE, f"{path} is in use ({reason}; a second vmmiod "
                              "for this guest?); it was left alone") from None
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, f"{path} is in use (another process listens on it; "
                          "a second vmmiod for this guest?); it was left alone")
