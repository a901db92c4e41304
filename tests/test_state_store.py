"""The device state record file (vmmiod/state/store.py): what is committed survives, a torn,
foreign, future or mismatched record is refused with a reason and never trusted."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from vmmiod.state.store import (
    FIXED,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    STATE_NAME,
    RecordRefused,
    StateStore,
)

LAYOUT = [[256, 256], [64, 64, 16]]


def _store(tmp_path: Path, guest: str = "g1", layout: list[list[int]] | None = None) -> StateStore:
    s = StateStore(tmp_path / STATE_NAME, guest, LAYOUT if layout is None else layout)
    s.open()
    return s


def test_committed_state_and_identity_survive_a_new_instance(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.set_identity("generic:1:2")
    s.windows[0].commit({"status": 15, "queues": [[256, 1, 2, 3, 1, 1, 0]]})
    s.windows[0].commit({"status": 15, "queues": [[256, 4, 5, 6, 1, 1, 0]]})
    s.windows[1].queue_areas[2][:4] = b"\x01\x02\x03\x04"
    s.close()  # or SIGKILL: the file is shared memory either way
    t = _store(tmp_path)
    assert t.refused is None
    t.check_identity("generic:1:2")
    assert t.windows[0].load() == {"status": 15, "queues": [[256, 4, 5, 6, 1, 1, 0]]}
    assert t.windows[1].load() is None
    assert bytes(t.windows[1].queue_areas[2][:4]) == b"\x01\x02\x03\x04"
    t.close()


def test_a_torn_commit_keeps_the_previous_state(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.set_identity("x")
    w = s.windows[0]
    w.commit({"status": 7})
    w.commit({"status": 15})
    # The writer dies half-way through the next commit: body written, sequence not yet.
    slot = w.slot
    at = slot.off + ((slot.seq + 1) & 1) * slot.copy
    s.buf[at + 16:at + 26] = b'{"status":'
    struct.pack_into("<II", s.buf, at + 8, 0xDEAD, 10)
    s.buf[at:at + 8] = struct.pack("<Q", slot.seq + 1)  # a sequence without a matching crc
    s.close()
    t = _store(tmp_path)
    assert t.windows[0].load() == {"status": 15}
    t.close()


def test_both_copies_torn_is_refused(tmp_path: Path) -> None:
    s = _store(tmp_path)
    w = s.windows[0]
    w.commit({"status": 7})
    w.commit({"status": 15})
    for k in (0, 1):
        at = w.slot.off + k * w.slot.copy
        s.buf[at + 20] ^= 0xFF  # a flipped body byte in each copy
    s.close()
    t = _store(tmp_path)
    with pytest.raises(RecordRefused) as exc:
        t.windows[0].load()
    assert exc.value.reason == "torn"
    t.close()


def test_record_of_another_guest_is_refused(tmp_path: Path) -> None:
    s = _store(tmp_path, guest="web1")
    s.set_identity("xen:5:1")
    s.close()
    t = _store(tmp_path, guest="web2")
    with pytest.raises(RecordRefused) as exc:
        t.check_identity("xen:5:1")
    assert exc.value.reason == "guest" and "web1" in str(exc.value)
    t.close()


def test_record_of_another_connection_is_refused(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.set_identity("generic:10:111")
    s.close()
    t = _store(tmp_path)
    with pytest.raises(RecordRefused) as exc:
        t.check_identity("generic:10:222")
    assert exc.value.reason == "identity"
    t.close()


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1])
def test_record_of_another_format_version_is_refused_with_a_reason(tmp_path: Path,
                                                                   version: int) -> None:
    s = _store(tmp_path)
    s.set_identity("x")
    s.windows[0].commit({"status": 15})
    s.close()
    path = tmp_path / STATE_NAME
    with open(path, "r+b") as f:
        head = bytearray(f.read(FIXED.size))
        struct.pack_into("<I", head, 8, version)
        f.seek(0)
        f.write(head)
    t = _store(tmp_path)
    assert t.refused is not None and t.refused.reason == "version"
    assert f"version {version}" in str(t.refused)
    assert ("newer" if version > FORMAT_VERSION else "older") in str(t.refused)
    # Re-initialised for this version: nothing of the old record is trusted.
    with pytest.raises(RecordRefused):
        t.check_identity("x")
    assert t.windows[0].load() is None
    t.close()
    assert struct.unpack_from("<8sI", path.read_bytes())[:2] == (MAGIC, FORMAT_VERSION)


def test_record_of_another_configuration_is_refused(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.set_identity("x")
    s.close()
    t = _store(tmp_path, layout=[[256, 256], [64, 64, 16], [128]])
    assert t.refused is not None and t.refused.reason == "layout"
    t.close()


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / STATE_NAME).write_bytes(os.urandom(HEADER_SIZE))
    t = _store(tmp_path)
    assert t.refused is not None and t.refused.reason == "corrupt"
    t.close()


def test_second_instance_cannot_take_the_lock(tmp_path: Path) -> None:
    s = _store(tmp_path)
    with pytest.raises(BlockingIOError):
        _store(tmp_path)
    s.close()


def test_frozen_store_records_nothing_more(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.set_identity("x")
    s.windows[0].commit({"status": 15})
    s.freeze()
    s.windows[0].commit({"status": 0})  # the orderly stop resets the devices
    s.set_identity(None)
    s.close()
    t = _store(tmp_path)
    t.check_identity("x")
    assert t.windows[0].load() == {"status": 15}
    t.close()
