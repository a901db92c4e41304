"""XenAdaptor: platform errors (each with its message and exit code 69), and the whole
prepare/start/serve/stop flow against the in-process Xen of tests/test_xen_fakexen.py."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.test_xen_fakexen import FakeXen
from vmmiod.bus import MmioBus
from vmmiod.config import BlockConfig, Config, GuestConfig, LogConfig, MmioConfig, XenConfig
from vmmiod.devices.base import VirtioDevice
from vmmiod.hypervisors.base import PlatformUnavailable
from vmmiod.hypervisors.xen import BackendMismatch, XenAdaptor
from vmmiod.hypervisors.xen import libs as xenlibs
from vmmiod.mmio import VirtioMmio

DOMID = 5
MAGIC_VIRT = 0x74726976


def make_config(devices: list[tuple[str, int | None, int | None]], *, domid: int | None = DOMID,
                name: str = "web", **xen: Any) -> Config:
    devs = tuple(
        BlockConfig(id=i, mmio=MmioConfig(base=b, irq=q, auto=b is None), path=Path("/dev/null"))
        for i, b, q in devices)
    return Config(path=Path("guest.yaml"), guest=GuestConfig(name=name, domid=domid),
                  hypervisor=XenConfig(**{"interrupts": "spi", **xen}), log=LogConfig(),
                  devices=devs)


@pytest.fixture
def dev_dir(tmp_path: Path) -> str:
    d = tmp_path / "xen"
    d.mkdir()
    for node in ("privcmd", "evtchn", "gntdev"):
        (d / node).write_bytes(b"")
    return str(d)


def log() -> Any:
    return structlog.get_logger().bind(test=True)


def adaptor(cfg: Config, fake: FakeXen | None, dev_dir: str, bus: Any = None) -> XenAdaptor:
    return XenAdaptor(cfg, bus if bus is not None else MmioBus(), log(),
                      loader=fake.loader if fake else None, dev_dir=dev_dir, machine="x86_64",
                      run_dir=os.path.join(dev_dir, "run"))


def prepare_fails(a: XenAdaptor) -> PlatformUnavailable:
    with pytest.raises(PlatformUnavailable) as info:
        asyncio.run(a.prepare())
    return info.value


def real_libraries() -> None:
    try:
        xenlibs.load_libraries()
    except PlatformUnavailable as exc:
        pytest.skip(f"Debian's Xen libraries are not installed: {exc}")


# -- platform errors -------------------------------------------------------------------------------
def test_missing_library_names_it_and_its_package(dev_dir: str) -> None:
    fake = FakeXen({DOMID: "web"}, missing=("libxenevtchn.so.1", "libxenstore.so.4"))
    exc = prepare_fails(adaptor(make_config([]), fake, dev_dir))
    assert exc.exit_code == 69
    assert "libxenevtchn.so.1" in str(exc) and "libxenstore.so.4" in str(exc)
    assert "apt-get install libxenevtchn1 libxenstore4" in str(exc)


def test_missing_library_with_the_real_loader(monkeypatch: pytest.MonkeyPatch,
                                              dev_dir: str) -> None:
    # The real ctypes loader, asked for a soname that does not exist.
    monkeypatch.setitem(xenlibs.SONAMES, "libxendevicemodel.so.99", ("dm", "libxendevicemodel99"))
    monkeypatch.delitem(xenlibs.SONAMES, "libxendevicemodel.so.1")
    exc = prepare_fails(adaptor(make_config([]), None, dev_dir))
    assert exc.exit_code == 69
    # The message lists every library this machine lacks (all six on a machine without Xen),
    # so the asserted package list is the one the machine itself gives.
    absent = [(s, p) for s, (_a, p) in xenlibs.SONAMES.items() if not _loads(s)]
    assert ("libxendevicemodel.so.99", "libxendevicemodel99") in absent
    assert str(exc).startswith("Xen libraries not found: " + ", ".join(s for s, _p in absent))
    assert str(exc).endswith("apt-get install " + " ".join(p for _s, p in absent))


def _loads(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def test_missing_dev_xen_with_real_libraries(tmp_path: Path) -> None:
    real_libraries()
    exc = prepare_fails(adaptor(make_config([]), None, str(tmp_path / "no-such-dir")))
    assert exc.exit_code == 69
    assert "does not exist" in str(exc) and "Xen dom0" in str(exc)
    assert "modprobe" in str(exc)


def test_missing_evtchn_node_with_real_libraries(dev_dir: str) -> None:
    real_libraries()
    os.unlink(os.path.join(dev_dir, "evtchn"))
    exc = prepare_fails(adaptor(make_config([]), None, dev_dir))
    assert exc.exit_code == 69
    assert str(exc) == (f"{dev_dir}/evtchn is missing: load the xen-evtchn module "
                        "(modprobe xen-evtchn)")


def test_no_xenstored_with_real_libraries(dev_dir: str) -> None:
    real_libraries()
    if os.path.exists("/var/run/xenstored/socket") or os.path.exists("/dev/xen/xenbus"):
        pytest.skip("a xenstored is reachable here")
    exc = prepare_fails(adaptor(make_config([]), None, dev_dir))
    assert exc.exit_code == 69
    assert "cannot connect to xenstored" in str(exc)
    assert "xenstored.service" in str(exc)


def test_hypervisor_without_ioreq_server(dev_dir: str) -> None:
    fake = FakeXen({DOMID: "web"})
    fake.add_domain(DOMID, "web")
    fake.dm_errno = errno.ENOSYS
    exc = prepare_fails(adaptor(make_config([]), fake, dev_dir))
    assert exc.exit_code == 69
    assert "no IOREQ server support" in str(exc)
    assert "CONFIG_IOREQ_SERVER=y" in str(exc)
    assert "xendevicemodel_create_ioreq_server" not in fake.names()  # failed before creating


def test_not_privileged(dev_dir: str) -> None:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    fake.dm_errno = errno.EPERM
    exc = prepare_fails(adaptor(make_config([]), fake, dev_dir))
    assert exc.exit_code == 69 and "not allowed to act as device model" in str(exc)


def test_domain_wait_is_bounded(dev_dir: str) -> None:
    fake = FakeXen()
    exc = prepare_fails(adaptor(make_config([], domid=None, name="late", domain_wait=0.3),
                                fake, dev_dir))
    assert exc.exit_code == 69
    assert "a domain named 'late' did not appear within 0.3 s" in str(exc)


def test_domain_found_by_name_after_waiting(dev_dir: str) -> None:
    fake = FakeXen()
    a = adaptor(make_config([], domid=None, name="late", domain_wait=5), fake, dev_dir)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, fake.add_domain, 9, "late")
        await a.prepare()
        assert a.domid == 9
        await a.stop()

    asyncio.run(scenario())


def test_auto_devices_without_backend_entries_is_a_config_problem(dev_dir: str) -> None:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)
    exc = prepare_fails(adaptor(make_config([("a", None, None), ("b", None, None)],
                                            domain_wait=0.3), fake, dev_dir))
    assert isinstance(exc, BackendMismatch) and exc.exit_code == 78
    assert "2 device(s) have 'mmio: auto'" in str(exc) and "1 free virtio backend entry" in str(exc)


def test_explicit_window_with_another_irq_is_refused(dev_dir: str) -> None:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)
    exc = prepare_fails(adaptor(make_config([("a", 0x2000000, 40)]), fake, dev_dir))
    assert exc.exit_code == 78 and "irq 33" in str(exc)


def test_backend_for_another_frontend_is_refused(dev_dir: str) -> None:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    path = fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)
    fake.store[f"{path}/frontend-id"] = "6"
    exc = prepare_fails(adaptor(make_config([("a", None, None)]), fake, dev_dir))
    assert exc.exit_code == 78 and "frontend-id is 6" in str(exc)


def test_spi_out_of_range_is_refused(dev_dir: str) -> None:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    exc = prepare_fails(adaptor(make_config([("a", 0x2000000, 5)], interrupts="spi"), fake,
                                dev_dir))
    assert exc.exit_code == 78 and "not an Arm SPI" in str(exc)


# -- the whole flow --------------------------------------------------------------------------------
class Dummy(VirtioDevice):
    device_id = 2


def test_prepare_start_serve_and_the_guest_going_away(dev_dir: str) -> None:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    # xl 4.17 writes a decimal base for disks; xl 4.18 a hex base for generic devices.
    disk = fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)
    virtio = fake.add_backend("virtio", DOMID, 0, "0x2000200", 34)
    cfg = make_config([("blk", None, None), ("net", None, None)], interrupts="spi",
                      map_cache_pages=512)
    bus = MmioBus()
    a = adaptor(cfg, fake, dev_dir, bus)

    async def scenario() -> None:
        await a.prepare()
        assert a.windows() == [("blk", 0x2000000, 33), ("net", 0x2000200, 34)]
        # The server is enabled for both windows before InitWait: xl unpauses a rebooted guest
        # right after InitWait, and its accesses must then wait for us, not fault.
        assert fake.server_enabled
        assert fake.ranges == [(0x2000000, 0x20001FF), (0x2000200, 0x20003FF)]
        assert fake.store[f"{disk}/state"] == "2" and fake.store[f"{virtio}/state"] == "2"
        assert not a.access_platform
        # An access made now (devices not built yet) is held, unanswered, until start().
        fake.guest_access(1, 0x2000200, 4, write=False)
        await asyncio.sleep(0.05)
        assert fake.slot(1)[0] == 1 and fake.notified == []
        for dev_id, base, irq in a.windows():
            dev = Dummy(dev_id, [8])
            bus.register(base, 0x200, VirtioMmio(dev, a.interrupt_line(irq)))
        await a.start()
        names = fake.names()
        # The reference order: nr_vcpus, create (bufioreq off), map frame 1, enable, bind, map.
        order = [n for n in names if n in (
            "xendevicemodel_nr_vcpus", "xendevicemodel_create_ioreq_server",
            "xenforeignmemory_map_resource", "xendevicemodel_set_ioreq_server_state",
            "xenevtchn_bind_interdomain", "xendevicemodel_map_io_range_to_ioreq_server",
            "xentoolcore_restrict_all")]
        # (nr_vcpus is first the dm_op probe of prepare(), then the server's own count.)
        assert order == ["xendevicemodel_nr_vcpus", "xendevicemodel_nr_vcpus",
                         "xendevicemodel_create_ioreq_server",
                         "xenforeignmemory_map_resource",
                         "xendevicemodel_set_ioreq_server_state",
                         "xenevtchn_bind_interdomain", "xenevtchn_bind_interdomain",
                         "xendevicemodel_map_io_range_to_ioreq_server",
                         "xendevicemodel_map_io_range_to_ioreq_server",
                         "xentoolcore_restrict_all"]
        assert sorted(fake.local_ports.values()) == [200, 201]  # every vCPU's port
        assert a.restricted and fake.restricted_with_open_xs == 0  # xenstore reopened after

        # vCPU 1's held read of MagicValue (second window) is answered; then vCPU 0 writes
        # InterruptACK.
        for _ in range(20):
            await asyncio.sleep(0.01)
            if fake.slot(1)[0] == 3:
                break
        assert fake.slot(1) == (3, MAGIC_VIRT)  # IORESP_READY with "virt"
        assert len(fake.notified) == 1
        fake.guest_access(0, 0x2000064, 4, write=True, data=1)
        for _ in range(20):
            await asyncio.sleep(0.01)
            if fake.slot(0)[0] == 3:
                break
        assert fake.slot(0)[0] == 3 and len(fake.notified) == 2
        assert a.counters["ioreqs"] == 2

        a.interrupt_line(33).raise_()
        assert fake.irqs == [("spi", 33, 1)]  # one level-1 call per edge
        assert a.counters["interrupts"] == 1

        # xl destroy: Closing -> we answer Closed; then the domain goes away.
        fake.toolstack_write(f"{disk}/state", "5")
        for _ in range(20):
            await asyncio.sleep(0.01)
            if fake.store[f"{disk}/state"] == "6":
                break
        assert fake.store[f"{disk}/state"] == "6"
        # Then xl removes the entry: nothing of it may be written back (no InitWait again).
        # (libxl was seen removing `state` before the rest of the directory.)
        del fake.store[f"{disk}/state"]
        fake.toolstack_write(f"{disk}/online", "0")
        await asyncio.sleep(0.1)
        assert f"{disk}/state" not in fake.store
        fake.remove_entry(disk)
        await asyncio.sleep(0.1)
        assert not [k for k in fake.store if k.startswith(disk + "/")]
        assert a.finished is not None and not a.finished.done()
        fake.destroy_domain(DOMID)
        assert await asyncio.wait_for(a.finished, 2) == 0
        before = len(fake.store)
        await a.stop()
        assert len(fake.store) == before  # no key recreated for the removed entries
        tail = [n for n in fake.names() if n in (
            "xendevicemodel_set_ioreq_server_state", "xendevicemodel_destroy_ioreq_server",
            "xenevtchn_unbind", "xenforeignmemory_unmap_resource")]
        assert tail[-5:] == ["xendevicemodel_set_ioreq_server_state",
                             "xendevicemodel_destroy_ioreq_server", "xenevtchn_unbind",
                             "xenevtchn_unbind", "xenforeignmemory_unmap_resource"]
        assert not fake.server_enabled

    asyncio.run(scenario())


def test_stop_writes_closed_for_entries_that_still_exist(dev_dir: str) -> None:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    disk = fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)
    cfg = make_config([("blk", 0x2000000, 33)])  # explicit window paired with the entry
    a = adaptor(cfg, fake, dev_dir)

    async def scenario() -> None:
        await a.prepare()
        await a.start()
        assert fake.store[f"{disk}/state"] == "2"
        await a.stop()
        assert fake.store[f"{disk}/state"] == "6"

    asyncio.run(scenario())


def test_entries_appearing_after_start_get_initwait(dev_dir: str) -> None:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    cfg = make_config([("blk", 0x2000000, 33)])
    a = adaptor(cfg, fake, dev_dir)

    async def scenario() -> None:
        await a.prepare()
        await a.start()
        disk = fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if fake.store[f"{disk}/state"] == "2":
                break
        assert fake.store[f"{disk}/state"] == "2"
        await a.stop()

    asyncio.run(scenario())


def test_grants_auto_follows_grant_usage(dev_dir: str) -> None:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    fake.add_backend("virtio", DOMID, 0, "0x2000000", 33, grant_usage=1)
    a = adaptor(make_config([("blk", None, None)]), fake, dev_dir)

    async def scenario() -> None:
        await a.prepare()
        assert a.access_platform
        await a.stop()

    asyncio.run(scenario())


def test_isa_and_msi_lines(dev_dir: str) -> None:
    for method, irq, expect in (("isa", 5, [("isa", 5, 1), ("isa", 5, 0)]),
                                ("msi", 80, [("msi", 0xFEE00000, 80)])):
        fake = FakeXen()
        fake.add_domain(DOMID, "web")
        a = adaptor(make_config([("blk", 0x2000000, irq)], interrupts=method), fake, dev_dir)

        async def scenario(a: XenAdaptor = a, irq: int = irq) -> None:
            await a.prepare()
            a.interrupt_line(irq).raise_()
            a.interrupt_line(irq).lower()
            await a.stop()

        asyncio.run(scenario())
        assert fake.irqs == expect


def test_errno_is_read_from_ctypes() -> None:
    ctypes.set_errno(errno.ENOSYS)
    with pytest.raises(OSError) as info:
        xenlibs.check(-1, "xendevicemodel_nr_vcpus")
    assert info.value.errno == errno.ENOSYS


def test_server_left_by_a_killed_instance_is_destroyed_first(dev_dir: str) -> None:
    """A SIGKILLed instance cannot destroy its IOREQ server; the next one must (record.py)."""
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)
    cfg = make_config([("blk", 0x2000000, 33)])
    rec = Path(dev_dir) / "run" / "ioreq-server.json"
    rec.parent.mkdir()
    rec.write_text(json.dumps({"domid": DOMID, "server": 5}))  # what the killed instance left
    a = adaptor(cfg, fake, dev_dir)

    async def scenario() -> None:
        await a.prepare()
        destroyed = [c for c in fake.calls if c[0] == "xendevicemodel_destroy_ioreq_server"]
        assert [c[2:] for c in destroyed] == [(DOMID, 5)]
        names = fake.names()
        assert names.index("xendevicemodel_destroy_ioreq_server") < \
            names.index("xendevicemodel_create_ioreq_server")
        assert json.loads(rec.read_text()) == {"domid": DOMID, "server": 3}  # ours, recorded
        await a.start()
        await a.stop()
        assert not rec.exists()  # an orderly stop leaves nothing for the next instance

    asyncio.run(scenario())


def test_record_of_another_domain_is_not_acted_on(dev_dir: str) -> None:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)
    rec = Path(dev_dir) / "run" / "ioreq-server.json"
    rec.parent.mkdir()
    rec.write_text(json.dumps({"domid": DOMID + 1, "server": 5}))  # a guest since rebuilt
    a = adaptor(make_config([("blk", 0x2000000, 33)]), fake, dev_dir)

    async def scenario() -> None:
        await a.prepare()
        assert "xendevicemodel_destroy_ioreq_server" not in fake.names()
        await a.stop()

    asyncio.run(scenario())
