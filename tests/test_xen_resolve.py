"""The domain-resolution race against the in-process Xen (tests/test_xen_fakexen.py).

libxl names a domain (/local/domain/<domid>/name) before it introduces it to xenstored, and
@releaseDomain fires for reasons other than our guest's end (at registration, for any other
domain, for a shutdown). vmmiod must serve the guest once it is introduced, never take it for
gone because a watch fired, and never end with status 0 without having served a guest that
exists.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from tests.test_xen_adaptor import adaptor, dev_dir, make_config, prepare_fails  # noqa: F401
from tests.test_xen_fakexen import FakeXen
from vmmiod.hypervisors.base import GuestGone
from vmmiod.hypervisors.xen import XenAdaptor

DOMID = 9


def _scenario(fake: FakeXen, a: Any, *, domid: int | None) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        introduced_at: list[float] = []

        def introduce() -> None:
            introduced_at.append(loop.time())
            fake.introduce(DOMID, "late")
            fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)

        fake.name_domain(DOMID, "late")  # named, not introduced
        loop.call_later(0.1, fake.fire_release)  # an early release (another domain's)
        loop.call_later(0.4, introduce)
        await a.prepare()
        assert introduced_at, "resolved a domain that was not introduced yet"
        assert a.domid == DOMID
        await a.start()
        # The watches' registration fires them; another domain goes: ours is still here.
        fake.fire_release()
        await asyncio.sleep(0.1)
        assert a.finished is not None and not a.finished.done()
        fake.destroy_domain(DOMID)
        assert await asyncio.wait_for(a.finished, 2) == 0
        await a.stop()

    asyncio.run(scenario())


def test_name_before_introduction_waits_for_it(dev_dir: str) -> None:  # noqa: F811
    fake = FakeXen()
    a = adaptor(make_config([("blk", None, None)], domid=None, name="late", domain_wait=5),
                fake, dev_dir)
    _scenario(fake, a, domid=None)


def test_explicit_domid_waits_for_introduction_too(dev_dir: str) -> None:  # noqa: F811
    fake = FakeXen()
    a = adaptor(make_config([("blk", None, None)], domid=DOMID, name="late", domain_wait=5),
                fake, dev_dir)
    _scenario(fake, a, domid=DOMID)


def test_named_but_never_introduced_is_not_success(dev_dir: str) -> None:  # noqa: F811
    fake = FakeXen()
    fake.name_domain(DOMID, "late")
    exc = prepare_fails(adaptor(make_config([], domid=None, name="late", domain_wait=0.5),
                                fake, dev_dir))
    assert exc.exit_code == 69 and "did not appear" in str(exc)


def test_newest_introduced_domain_of_the_name_is_ours(dev_dir: str) -> None:  # noqa: F811
    """A reboot: the dying domain (no longer introduced) still has its name in xenstore."""
    fake = FakeXen()
    fake.name_domain(4, "web")  # dying: named, not introduced any more
    fake.add_domain(12, "web")
    a = adaptor(make_config([], domid=None, name="web", domain_wait=1), fake, dev_dir)

    async def scenario() -> None:
        await a.prepare()
        assert a.domid == 12
        await a.stop()

    asyncio.run(scenario())


def test_service_instance_waits_for_the_entry_of_an_explicit_window(dev_dir: str) -> None:  # noqa: F811
    """Started at introduction (require_entries), an instance must not serve an explicit
    window before the toolstack declared it: the irq check would be skipped."""
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    a = adaptor(make_config([("blk", 0x2000000, 40)], domid=DOMID, name="web", domain_wait=5,
                            require_entries=True), fake, dev_dir)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, fake.add_backend, "virtio_disk", DOMID, 51712, "33554432", 33)
        await a.prepare()

    with pytest.raises(Exception) as info:
        asyncio.run(scenario())
    assert getattr(info.value, "exit_code", None) == 78 and "irq 33" in str(info.value)
    assert not fake.server_enabled


def test_service_instance_answers_each_entry_as_it_comes(dev_dir: str) -> None:  # noqa: F811
    """libxl gives each entry its own 10 s from its own write: the first window is claimed and
    answered InitWait while the last entry is still to come."""
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    a = adaptor(make_config([("a", None, None), ("b", None, None)], domid=DOMID, name="web",
                            domain_wait=5, require_entries=True), fake, dev_dir)
    first = "/local/domain/0/backend/virtio_disk/9/51712"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        seen: list[tuple[str | None, list[tuple[int, int]]]] = []
        fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)

        def second() -> None:
            seen.append((fake.store.get(f"{first}/state"), list(fake.ranges)))
            fake.add_backend("virtio_disk", DOMID, 51728, "33554944", 34)

        loop.call_later(0.6, second)
        await a.prepare()
        assert seen == [("2", [(0x2000000, 0x20001FF)])]
        assert fake.ranges == [(0x2000000, 0x20001FF), (0x2000200, 0x20003FF)]
        assert fake.store["/local/domain/0/backend/virtio_disk/9/51728/state"] == "2"
        assert a.windows() == [("a", 0x2000000, 33), ("b", 0x2000200, 34)]
        await a.stop()

    asyncio.run(scenario())


def _gone_while_waiting(dev_dir: str, entries_first: int  # noqa: F811
                        ) -> tuple[FakeXen, Any, BaseException]:
    """A service instance (require_entries) waits for two devices' entries; the toolstack
    writes `entries_first` of them, then the domain dies (libxl failed to build it, or `xl
    destroy` during creation). domain_wait is 30 s: the instance must not wait that long."""
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    a = adaptor(make_config([("a", None, None), ("b", None, None)], domid=DOMID, name="web",
                            domain_wait=30, require_entries=True), fake, dev_dir)

    async def scenario() -> BaseException:
        loop = asyncio.get_running_loop()
        for k in range(entries_first):
            fake.add_backend("virtio_disk", DOMID, 51712 + 16 * k, str(0x2000000 + 0x200 * k),
                             33 + k)
        loop.call_later(0.3, fake.destroy_domain, DOMID)
        try:  # without noticing, prepare() would fail only after domain_wait (30 s)
            await asyncio.wait_for(a.prepare(), 10)
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            return exc
        finally:
            await a.stop()
        raise AssertionError("prepare() served a domain that went away")

    return fake, a, asyncio.run(scenario())


def test_domain_gone_before_its_entries_is_a_finished_guest(dev_dir: str) -> None:  # noqa: F811
    fake, _a, exc = _gone_while_waiting(dev_dir, 0)
    assert isinstance(exc, GuestGone), repr(exc)
    assert exc.exit_code == 0
    assert "went away" in str(exc) and f"domain {DOMID}" in str(exc)
    assert not fake.servers


def test_domain_gone_after_some_entries_destroys_the_early_server(dev_dir: str) -> None:  # noqa: F811
    """The first window was already claimed (and answered InitWait): its IOREQ server and the
    record of it go with the domain."""
    fake, a, exc = _gone_while_waiting(dev_dir, 1)
    assert isinstance(exc, GuestGone), repr(exc)
    assert "xendevicemodel_create_ioreq_server" in fake.names()
    assert not fake.servers
    assert not os.path.exists(a._record)


def test_daemon_ends_with_0_and_says_the_guest_went_away(
        dev_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The whole instance (vmmiod.daemon): guest_finished with exit status 0, which the dom0
    service reaps as a guest that went away (dom0_guest_exited), not startup_failed 78."""
    from tests.test_dom0 import Log
    from vmmiod import daemon
    from vmmiod.systemd import Notifier

    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    monkeypatch.setattr(daemon, "ADAPTORS", {"xen": ("tests.test_xen_resolve", "_Adaptor")})
    monkeypatch.setattr(_Adaptor, "fake", fake, raising=False)
    monkeypatch.setattr(_Adaptor, "dev", dev_dir, raising=False)
    log = Log()
    d = daemon.Daemon(make_config([("a", None, None)], domid=DOMID, name="web", domain_wait=30,
                                  require_entries=True), notifier=Notifier(env={}), log=log)

    async def scenario() -> int:
        asyncio.get_running_loop().call_later(0.3, fake.destroy_domain, DOMID)
        return await asyncio.wait_for(d.run(), 10)

    assert asyncio.run(scenario()) == 0
    assert not log.named("startup_failed")
    gone = log.named("xen_domain_gone")
    assert len(gone) == 1 and gone[0]["domid"] == DOMID and gone[0]["served"] is False
    finished = log.named("guest_finished")
    assert len(finished) == 1 and finished[0]["exit_code"] == 0
    assert finished[0]["served"] is False and "went away" in finished[0]["message"]
    assert log.named("daemon_stopped")[-1]["exit_code"] == 0


class _Adaptor(XenAdaptor):
    """The XenAdaptor as the daemon builds it, on the in-process Xen."""

    fake: FakeXen
    dev: str

    def __init__(self, config: Any, bus: Any, log: Any) -> None:
        super().__init__(config, bus, log, loader=self.fake.loader, dev_dir=self.dev,
                         machine="x86_64", run_dir=os.path.join(self.dev, "run"))


def test_domain_gone_during_preparation_is_a_finished_guest(dev_dir: str) -> None:  # noqa: F811
    """The domain dies between its resolution and the first dm_op (which then fails with
    ESRCH): a guest that finished, not a platform problem (69)."""
    fake = FakeXen()
    fake.add_domain(DOMID, "web")
    fake.add_backend("virtio_disk", DOMID, 51712, "33554432", 33)
    probe = fake.ns.xendevicemodel_nr_vcpus

    def dying(*args: Any) -> Any:
        fake.destroy_domain(DOMID)
        return probe(*args)

    fake.ns.xendevicemodel_nr_vcpus = dying
    a = adaptor(make_config([("blk", None, None)], domid=DOMID, name="web", domain_wait=5),
                fake, dev_dir)
    with pytest.raises(GuestGone) as info:
        asyncio.run(a.prepare())
    assert "went away" in str(info.value) and "dm_op" in str(info.value)
    alive = FakeXen()  # the same failure with the domain still there stays a platform problem
    alive.add_domain(DOMID, "web")
    alive.dm_errno = 3  # ESRCH from a hypervisor that still lists the domain
    exc = prepare_fails(adaptor(make_config([], domid=DOMID, name="web"), alive, dev_dir))
    assert exc.exit_code == 69 and "dm_op on domain" in str(exc)
