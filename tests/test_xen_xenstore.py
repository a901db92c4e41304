"""xenstore numbers, backend entries, pairing; and the real libxenstore's read/write/watch
paths against the in-process model."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from tests.test_xen_fakexen import FakeXen
from vmmiod.hypervisors.xen import libs as xenlibs
from vmmiod.hypervisors.xen.backends import Backends, MismatchError
from vmmiod.hypervisors.xen.xenstore import (
    XenStore,
    entry_problems,
    find_domid_by_name,
    parse_number,
    read_backend_entries,
)


@pytest.mark.parametrize("text,hex_default,value", [
    ("33554432", False, 0x2000000),  # virtio_disk base: decimal
    ("0x2000200", False, 0x2000200),  # virtio base: hex with prefix
    ("0x2000200", True, 0x2000200),
    ("2000200", True, 0x2000200),  # a hex key without prefix
    ("33", False, 33),
    ("2000ab0", False, 0x2000AB0),  # hex digits mean hex even when not expected
    (" 33\n", False, 33),
    ("", False, None),
    (None, False, None),
    ("0x", False, None),
    ("-5", False, None),
    ("12z", False, None),
    ("9" * 40, False, None),  # absurdly long: refused, not parsed
])
def test_parse_number(text: str | None, hex_default: bool, value: int | None) -> None:
    assert parse_number(text, hex_default) == value


def store(fake: FakeXen) -> XenStore:
    return XenStore(xenlibs.load_libraries(fake.loader))


def test_read_write_directory_watch_through_the_ctypes_layer() -> None:
    fake = FakeXen()
    xs = store(fake)
    xs.write("/a/b", "hello")
    xs.write("/a/c", "")
    assert xs.read("/a/b") == "hello" and xs.read("/a/c") == "" and xs.read("/a/x") is None
    assert xs.directory("/a") == ["b", "c"]
    assert xs.directory("/none") == []
    xs.watch("/a", "tok")
    assert xs.check_watch() == ("/a", "tok")  # registration fires once
    assert xs.check_watch() is None
    fake.toolstack_write("/a/b", "x")
    assert xs.check_watch() == ("/a/b", "tok")
    xs.close()


def test_backend_entries_sorted_by_base_and_checked() -> None:
    fake = FakeXen()
    fake.add_backend("virtio", 5, 0, "0x2000400", 35, grant_usage=0)
    fake.add_backend("virtio_disk", 5, 51728, "33554944", 34)
    fake.add_backend("virtio_disk", 5, 51712, "33554432", 33)
    fake.store["/local/domain/0/backend/virtio_disk/5/99/base"] = "junk"
    log = structlog.get_logger()
    entries = read_backend_entries(store(fake), 0, 5, log)
    assert [(e.kind, e.devid, e.base, e.irq) for e in entries] == [
        ("virtio_disk", 51712, 0x2000000, 33), ("virtio_disk", 51728, 0x2000200, 34),
        ("virtio", 0, 0x2000400, 35)]
    assert entries[2].grant_usage is False and entries[0].grant_usage is None
    assert entry_problems(entries[0], 5) == []
    assert entry_problems(entries[0], 6) != []


def test_find_domid_by_name() -> None:
    fake = FakeXen()
    fake.add_domain(0, "Domain-0")
    fake.add_domain(7, "web")
    xs = store(fake)
    assert find_domid_by_name(xs, "web") == 7
    assert find_domid_by_name(xs, "db") is None


def dev(id_: str, base: int | None = None, irq: int | None = None) -> Any:
    return SimpleNamespace(id=id_, mmio=SimpleNamespace(base=base, irq=irq, auto=base is None))


def test_pairing_explicit_then_auto_in_order() -> None:
    fake = FakeXen()
    for i, devid in enumerate((51712, 51728, 51744)):
        fake.add_backend("virtio_disk", 5, devid, str(0x2000000 + 0x200 * i), 33 + i)
    b = Backends(store(fake), 0, 5, [dev("a"), dev("fixed", 0x2000200, 34), dev("c")],
                 structlog.get_logger())
    assert b.discover()
    assert b.auto_windows() == [("a", 0x2000000, 33), ("c", 0x2000400, 35)]
    assert fake.store["/local/domain/0/backend/virtio_disk/5/51712/state"] == "1"
    b.serving = True
    b.sync()
    assert all(fake.store[f"/local/domain/0/backend/virtio_disk/5/{d}/state"] == "2"
               for d in (51712, 51728, 51744))


def test_unserved_entry_is_left_alone() -> None:
    fake = FakeXen()
    fake.add_backend("virtio_disk", 5, 51712, "33554432", 33)
    fake.add_backend("virtio_disk", 5, 51728, "33554944", 34)
    b = Backends(store(fake), 0, 5, [dev("a")], structlog.get_logger())
    assert b.discover()
    b.serving = True
    b.sync()
    assert fake.store["/local/domain/0/backend/virtio_disk/5/51712/state"] == "2"
    assert fake.store["/local/domain/0/backend/virtio_disk/5/51728/state"] == "1"


def test_mixed_grant_usage_is_reported() -> None:
    fake = FakeXen()
    fake.add_backend("virtio", 5, 0, "0x2000000", 33, grant_usage=1)
    fake.add_backend("virtio", 5, 1, "0x2000200", 34, grant_usage=0)
    b = Backends(store(fake), 0, 5, [dev("a"), dev("b")], structlog.get_logger())
    assert b.discover()
    assert b.grant_usage() is None


def test_waiting_for_entries() -> None:
    fake = FakeXen()
    b = Backends(store(fake), 0, 5, [dev("a")], structlog.get_logger())
    assert not b.discover()
    assert b.missing_ids() == ["a"]
    fake.add_backend("virtio_disk", 5, 51712, "33554432", 33)
    assert b.discover()


def test_explicit_irq_mismatch() -> None:
    fake = FakeXen()
    fake.add_backend("virtio_disk", 5, 51712, "33554432", 33)
    b = Backends(store(fake), 0, 5, [dev("a", 0x2000000, 40)], structlog.get_logger())
    with pytest.raises(MismatchError):
        b.discover()


def test_real_libxenstore_open_fails_cleanly_without_xenstored() -> None:
    try:
        libs = xenlibs.load_libraries()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Xen libraries not installed: {exc}")
    if os.path.exists("/var/run/xenstored/socket") or os.path.exists("/dev/xen/xenbus"):
        pytest.skip("a xenstored is reachable here")
    with pytest.raises(OSError):
        XenStore(libs)
