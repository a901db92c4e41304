"""`vmmiod dom0` against the in-process Xen (tests/test_xen_fakexen.py): guests found through
the toolstack's backend entries, one instance each (forked), reaped, restarted after a crash,
a new one for a rebooted guest; guests without a YAML left alone, bad YAMLs failing alone."""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from tests.test_xen_fakexen import FakeXen
from vmmiod.config import Config
from vmmiod.dom0 import Dom0Service

YAML = """\
guest:
  name: {name}
hypervisor:
  kind: xen
devices:
  - id: disk0
    type: block
    mmio: auto
    path: {image}
"""


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def bind(self, **_kw: Any) -> Log:
        return self

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((level, event, kw))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for _lvl, ev, kw in self.events if ev == event]


class Children:
    """Instead of running a daemon, each instance is a forked child that exits with the next
    scripted status once told to (or right away)."""

    def __init__(self) -> None:
        self.configs: list[Config] = []
        self.pids: list[int] = []
        self.codes: deque[int] = deque()

    def __call__(self, config: Config) -> int:
        self.configs.append(config)
        code = self.codes.popleft() if self.codes else None
        # The signals the child waits for are blocked across the fork: one sent before the
        # child got to sigwait() must not kill it instead (exit -15, not 0).
        waited = {signal.SIGTERM, signal.SIGUSR1}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if pid == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            if code is None:  # serve until SIGTERM (SIGUSR1: exit 10, to show it arrived)
                got = signal.sigwait(waited)
                os._exit(10 if got == signal.SIGUSR1 else 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            os._exit(code)
        self.pids.append(pid)
        return pid


@pytest.fixture
def env(tmp_path: Path) -> tuple[FakeXen, Dom0Service, Children, Log, Path]:
    fake = FakeXen()
    conf = tmp_path / "etc"
    conf.mkdir()
    image = tmp_path / "img"
    image.write_bytes(b"\0" * 4096)
    for name in ("web1", "web2"):
        (conf / f"{name}.yaml").write_text(YAML.format(name="ignored", image=image))
    (conf / "bad.yaml").write_text("guest:\n  name: bad\nhypervisor:\n  kind: nope\n")
    log = Log()
    kids = Children()
    svc = Dom0Service(conf, log=log, loader=fake.loader, spawn=kids, run_dir=tmp_path / "run")
    # The real signal handlers of the service stay out of the test process.
    svc.open = lambda: _open(svc)  # type: ignore[method-assign]
    svc.open()
    yield fake, svc, kids, log, conf
    for pid in kids.pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    if svc.xs is not None:
        svc.xs.close()


def _open(svc: Dom0Service) -> None:
    from vmmiod.hypervisors.xen.libs import load_libraries
    from vmmiod.hypervisors.xen.toolstack import watch_paths
    from vmmiod.hypervisors.xen.xenstore import XenStore

    svc.xs = XenStore(load_libraries(svc._loader))
    svc.backend_domid = 0
    for path in watch_paths(0):
        svc.xs.watch(path, "t")
    svc._wake_r, svc._wake_w = os.pipe()


def create(fake: FakeXen, domid: int, name: str) -> None:
    """What xl create does: name, introduce, one virtio disk entry waiting for InitWait."""
    fake.name_domain(domid, name)
    fake.introduce(domid, name)
    fake.add_backend("virtio_disk", domid, 51712, "33554432", 33)


def settle(svc: Dom0Service, until: Any, limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        svc.step(0.05)
        if until():
            return
    raise AssertionError("condition not reached")


def test_each_guest_gets_its_own_instance_with_the_toolstack_domid(env: Any) -> None:
    fake, svc, kids, log, conf = env
    create(fake, 3, "web1")
    create(fake, 4, "web2")
    settle(svc, lambda: len(svc.instances) == 2)
    by_domid = {c.guest.domid: c for c in kids.configs}
    assert set(by_domid) == {3, 4}
    assert by_domid[3].guest.name == "web1" and by_domid[4].guest.name == "web2"
    assert str(by_domid[3].path) == str(conf / "web1.yaml")
    assert len(set(kids.pids)) == 2
    # More watch events change nothing: one instance per guest.
    fake.toolstack_write("/local/domain/0/backend/virtio_disk/3/51712/state", "2")
    settle(svc, lambda: True)
    assert len(kids.configs) == 2
    svc.stop_instances(grace=5)
    assert not svc.instances
    assert [e["exit_code"] for e in log.named("dom0_guest_exited")] == [0, 0]


def test_guest_without_yaml_is_left_alone_with_one_line(env: Any) -> None:
    fake, svc, kids, log, _ = env
    create(fake, 7, "stranger")
    for _ in range(5):
        svc.step(0.02)
    fake.toolstack_write("/local/domain/0/backend/virtio_disk/7/51712/online", "1")
    svc.step(0.02)
    assert kids.configs == []
    assert [e["guest"] for e in log.named("dom0_guest_unconfigured")] == ["stranger"]


def test_bad_yaml_and_failing_instance_fail_that_guest_only(env: Any) -> None:
    fake, svc, kids, log, _ = env
    create(fake, 5, "bad")  # invalid file: no instance at all
    kids.codes.append(78)  # web1's instance: the YAML does not match the toolstack's devices
    create(fake, 6, "web1")
    settle(svc, lambda: bool(log.named("dom0_guest_failed")))
    invalid = log.named("dom0_guest_config_invalid")
    assert invalid and invalid[0]["guest"] == "bad" and invalid[0]["problems"]
    failed = log.named("dom0_guest_failed")[0]
    assert failed["exit_code"] == 78 and "does not match the toolstack" in failed["reason"]
    assert len(kids.configs) == 1  # not restarted
    create(fake, 8, "web2")  # the service goes on serving others
    settle(svc, lambda: 8 in svc.instances)


def test_crashed_instance_is_restarted_while_its_domain_exists(env: Any) -> None:
    fake, svc, kids, log, _ = env
    kids.codes.extend([-signal.SIGSEGV % 256, 1])  # two crashes (exit 11, exit 1), then serve
    create(fake, 9, "web1")
    settle(svc, lambda: len(kids.configs) == 3 and 9 in svc.instances)
    assert [e["restarts"] for e in log.named("dom0_guest_started")] == [0, 1, 2]
    assert len(log.named("dom0_guest_restarting")) == 2


def test_rebooted_guest_gets_a_new_instance(env: Any) -> None:
    fake, svc, kids, _log, _ = env
    create(fake, 10, "web1")
    settle(svc, lambda: 10 in svc.instances)
    # The guest reboots: its instance ends with the domain (status 0); xl builds a new domain.
    os.kill(svc.instances[10].pid, signal.SIGTERM)
    fake.destroy_domain(10)
    settle(svc, lambda: 10 not in svc.instances)
    create(fake, 11, "web1")
    settle(svc, lambda: 11 in svc.instances)
    assert [c.guest.domid for c in kids.configs] == [10, 11]
    # The old domain's entries are gone: it is forgotten.
    assert 10 not in svc.settled


def test_sigusr1_is_passed_on_to_every_instance(env: Any) -> None:
    """`systemctl kill -s USR1 vmmiod-dom0` asks every instance for its counters; the service
    itself must not die of it (SIGUSR1's default action)."""
    fake, svc, _kids, log, _ = env
    create(fake, 10, "web1")
    create(fake, 11, "web2")
    settle(svc, lambda: {10, 11} <= set(svc.instances))
    svc._on_signal(signal.SIGUSR1, None)
    # The scripted children leave with status 10 when SIGUSR1 reaches them.
    settle(svc, lambda: len(log.named("dom0_guest_restarting")) == 2)
    assert sorted(e["domid"] for e in log.named("dom0_guest_restarting")) == [10, 11]
    assert all(e["exit_code"] == 10 for e in log.named("dom0_guest_restarting"))


def test_forked_instance_runs_the_daemon(tmp_path: Path) -> None:
    """The real fork path: the child runs vmmiod.daemon.run with the guest's config; on this
    machine it ends with a status the service reports (69 without Xen's libraries, or another
    failure: there is no real domain 3), and the service carries on."""
    fake = FakeXen()
    conf = tmp_path / "etc"
    conf.mkdir()
    image = tmp_path / "img"
    image.write_bytes(b"\0" * 4096)
    (conf / "web1.yaml").write_text(YAML.format(name="web1", image=image).replace(
        "  kind: xen\n", "  kind: xen\n  domain_wait: 0.5\n"))
    log = Log()
    svc = Dom0Service(conf, log=log, loader=fake.loader, run_dir=tmp_path / "run",
                      log_format="json")
    svc.open = lambda: _open(svc)  # type: ignore[method-assign]
    svc.open()
    try:
        create(fake, 3, "web1")
        settle(svc, lambda: bool(log.named("dom0_guest_failed") or
                                 log.named("dom0_guest_exited")), limit=30)
        ended = (log.named("dom0_guest_failed") + log.named("dom0_guest_exited"))[0]
        assert ended["domid"] == 3 and ended["exit_code"] != 0
    finally:
        svc.xs.close()


def test_instance_starts_at_introduction_when_the_guest_has_a_yaml(env: Any) -> None:
    """Forked as soon as xenstored introduces the domain, the instance is ready when libxl
    writes the entries; a domain with neither a YAML nor entries is none of our business."""
    fake, svc, kids, log, _ = env
    fake.name_domain(12, "web1")
    svc.step(0.02)
    assert kids.configs == []  # named, not introduced yet
    fake.introduce(12, "web1")
    fake.add_domain(13, "plain")  # no YAML, no virtio devices
    settle(svc, lambda: 12 in svc.instances)
    cfg = kids.configs[0]
    assert cfg.guest.domid == 12 and cfg.hypervisor.require_entries  # type: ignore[union-attr]
    assert not log.named("dom0_guest_unconfigured")


def test_without_xen_the_service_says_so_and_exits_69(tmp_path: Path) -> None:
    fake = FakeXen(missing=("libxenstore.so.4",))
    log = Log()
    svc = Dom0Service(tmp_path, log=log, loader=fake.loader, run_dir=tmp_path / "run")
    assert svc.run() == 69
    msg = log.named("dom0_unavailable")[0]["message"]
    assert "libxenstore.so.4" in msg


def test_cli_dom0_command(tmp_path: Path) -> None:
    from vmmiod.cli import build_parser

    args = build_parser().parse_args(["dom0", "--config-dir", str(tmp_path),
                                      "--backend-domid", "3", "--log-format", "json"])
    assert (args.command, args.config_dir, args.backend_domid, args.log_format) == \
        ("dom0", tmp_path, 3, "json")
