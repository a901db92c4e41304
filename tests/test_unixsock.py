"""Taking over a socket path at start-up (vmmiod/unixsock.py): only a dead socket is removed."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from vmmiod.unixsock import clear_stale_socket

TYPES = [socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM]


def test_nothing_there_is_fine(tmp_path: Path) -> None:
    clear_stale_socket(tmp_path / "none.sock")


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket") as info:
        clear_stale_socket(path)
    assert info.value.errno == errno.EEXIST and path.read_text() == "keep me"


@pytest.mark.parametrize("kind", TYPES, ids=["stream", "seqpacket", "dgram"])
def test_a_dead_socket_is_removed_and_a_live_one_left_alone(tmp_path: Path, kind: int) -> None:
    path = tmp_path / "s.sock"
    dead = socket.socket(socket.AF_UNIX, kind)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody serves it: a killed predecessor's
    clear_stale_socket(path, kind)
    assert not path.exists()
    live = socket.socket(socket.AF_UNIX, kind)
    try:
        live.bind(str(path))
        if kind != socket.SOCK_DGRAM:
            live.listen(1)
        with pytest.raises(FileExistsError, match="in use") as info:
            clear_stale_socket(path, kind)
        assert info.value.errno == errno.EADDRINUSE and path.exists()
    finally:
        live.close()


def test_a_live_listener_with_a_full_backlog_is_still_live(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(0)
    waiting = []
    try:
        for _ in range(4):  # fill the backlog: further connects would block (EAGAIN)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(str(path))
            except BlockingIOError:
                pass
            waiting.append(c)
        with pytest.raises(FileExistsError, match="in use"):
            clear_stale_socket(path)
        assert path.exists()
    finally:
        for c in waiting:
            c.close()
        live.close()


def test_a_socket_of_another_type_is_not_taken_for_dead(tmp_path: Path) -> None:
    path = tmp_path / "other.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    live.bind(str(path))
    try:
        with pytest.raises(FileExistsError):
            clear_stale_socket(path, socket.SOCK_STREAM)  # EPROTOTYPE: proves nothing
        assert path.exists()
    finally:
        live.close()
