"""A new instance takes over the IOREQ server the previous one left (docs/restart.md), against the
in-process Xen of tests/test_xen_fakexen.py: after a SIGKILL (nothing torn down) and after an
orderly stop for a restart (SIGTERM: the server left in place); and a server Xen no longer
knows is destroyed, as before, with the reason logged."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from structlog.testing import capture_logs

from tests.test_xen_adaptor import DOMID, MAGIC_VIRT, Dummy, adaptor, dev_dir, make_config
from tests.test_xen_fakexen import FakeXen
from vmmiod.bus import MmioBus
from vmmiod.hypervisors.xen import XenAdaptor
from vmmiod.mmio import VirtioMmio

BASE, IRQ = 0x2000000, 33
__all__ = ["dev_dir"]  # the fixture, shared with test_xen_adaptor
STATE_READY, STATE_INPROCESS, STATE_RESP = 1, 2, 3


def _guest() -> FakeXen:
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    fake.add_backend("virtio_disk", DOMID, 51712, str(BASE), IRQ)
    return fake


async def _instance(fake: FakeXen, dev_dir: str, seen: list[str | None]) -> XenAdaptor:
    bus = MmioBus()
    a = adaptor(make_config([("blk", None, None)]), fake, dev_dir, bus)
    a.on_guest = seen.append
    await a.prepare()
    for dev_id, base, irq in a.windows():
        bus.register(base, 0x200, VirtioMmio(Dummy(dev_id, [8]), a.interrupt_line(irq)))
    await a.start()
    return a


def _killed(a: XenAdaptor, fake: FakeXen) -> None:
    """SIGKILL: nothing runs; the kernel closes the process's event channel ends."""
    assert a.server is not None
    assert a.server._loop is not None
    a.server._loop.remove_reader(fake.ev_r)
    for port in a.server.ports:
        fake.local_ports.pop(port, None)


async def _answered(fake: FakeXen, vcpu: int) -> tuple[int, int]:
    for _ in range(50):
        if fake.slot(vcpu)[0] == STATE_RESP:
            break
        await asyncio.sleep(0.01)
    return fake.slot(vcpu)


def _set_state(fake: FakeXen, vcpu: int, state: int) -> None:
    raw = bytearray(fake.page[vcpu * 32: vcpu * 32 + 32])
    raw[30] = (raw[30] & ~0xF) | state
    fake.page[vcpu * 32: vcpu * 32 + 32] = bytes(raw)


def test_sigkilled_instance_server_is_taken_over_and_held_requests_answered(
        dev_dir: str) -> None:
    fake = _guest()
    seen: list[str | None] = []

    async def scenario() -> None:
        a = await _instance(fake, dev_dir, seen)
        assert fake.servers == {3}
        _killed(a, fake)
        # While no instance runs, vCPU 0 reads MagicValue and vCPU 1's request was taken
        # (INPROCESS) by the dead instance: both vCPUs wait.
        fake.guest_access(0, BASE, 4, write=False)
        fake.guest_access(1, BASE, 4, write=False)
        _set_state(fake, 1, STATE_INPROCESS)
        fake.notified.clear()
        with capture_logs() as logs:
            b = await _instance(fake, dev_dir, seen)
        names = fake.names()
        assert names.count("xendevicemodel_create_ioreq_server") == 1  # A's only
        assert "xendevicemodel_destroy_ioreq_server" not in names
        assert fake.servers == {3} and fake.server_enabled
        assert sorted(fake.local_ports.values()) == [200, 201]  # bound again
        assert fake.ranges == [(BASE, BASE + 0x1FF)]  # kept by Xen, claimed again (EEXIST)
        assert await _answered(fake, 0) == (STATE_RESP, MAGIC_VIRT)
        assert await _answered(fake, 1) == (STATE_RESP, MAGIC_VIRT)
        assert len(fake.notified) == 2
        assert seen[0] == seen[1] and seen[0] is not None  # same guest: the devices resume
        assert any(e["event"] == "xen_ioreq_server_reattached" for e in logs)
        # And it carries on.
        fake.guest_access(0, BASE + 4, 4, write=False)
        assert await _answered(fake, 0) == (STATE_RESP, 2)
        await b.stop()
        assert fake.servers == set()  # an orderly stop for good destroys it

    asyncio.run(scenario())


def test_stop_for_a_restart_leaves_the_server_for_the_next_instance(dev_dir: str) -> None:
    fake = _guest()
    seen: list[str | None] = []
    rec = Path(dev_dir) / "run" / "ioreq-server.json"

    async def scenario() -> None:
        a = await _instance(fake, dev_dir, seen)
        a.handover = True  # what the daemon sets on SIGTERM
        a.quiesce()
        fake.guest_access(0, BASE, 4, write=False)  # arrives during the stop: waits
        await asyncio.sleep(0.05)
        assert fake.slot(0)[0] == STATE_READY
        await a.stop()
        assert fake.servers == {3} and fake.server_enabled
        assert json.loads(rec.read_text()) == {"domid": DOMID, "server": 3}
        assert fake.local_ports == {}  # only our ends went
        backend = [k for k in fake.store if k.endswith("/state")]
        assert all(fake.store[k] != "6" for k in backend)  # not Closed for the toolstack
        b = await _instance(fake, dev_dir, seen)
        assert await _answered(fake, 0) == (STATE_RESP, MAGIC_VIRT)
        assert "xendevicemodel_destroy_ioreq_server" not in fake.names()
        await b.stop()

    asyncio.run(scenario())


def test_server_xen_refuses_is_destroyed_and_a_new_one_created(dev_dir: str) -> None:
    fake = _guest()
    seen: list[str | None] = []
    rec = Path(dev_dir) / "run" / "ioreq-server.json"
    rec.parent.mkdir()
    rec.write_text(json.dumps({"domid": DOMID, "server": 7}))  # Xen has no server 7

    async def scenario() -> None:
        with capture_logs() as logs:
            a = await _instance(fake, dev_dir, seen)
        failed = [e for e in logs if e["event"] == "xen_server_reattach_failed"]
        assert failed and "refused" in failed[0]["reason"]
        destroyed = [c[2:] for c in fake.calls if c[0] == "xendevicemodel_destroy_ioreq_server"]
        assert destroyed == [(DOMID, 7)]
        assert fake.servers == {3}
        assert json.loads(rec.read_text()) == {"domid": DOMID, "server": 3}
        await a.stop()

    asyncio.run(scenario())


def test_record_of_another_domain_is_dropped_with_a_reason(dev_dir: str) -> None:
    fake = _guest()
    rec = Path(dev_dir) / "run" / "ioreq-server.json"
    rec.parent.mkdir()
    rec.write_text(json.dumps({"domid": DOMID + 1, "server": 3}))
    seen: list[str | None] = []

    async def scenario() -> None:
        with capture_logs() as logs:
            a = await _instance(fake, dev_dir, seen)
        assert [e["reason"] for e in logs if e["event"] == "xen_server_record_ignored"]
        assert "xendevicemodel_destroy_ioreq_server" not in fake.names()
        await a.stop()

    asyncio.run(scenario())
