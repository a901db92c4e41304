"""Good configurations: what the YAML says is what the dataclasses hold."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmiod import config as c
from vmmiod.cli import describe
from vmmiod.config import ConfigError, load, load_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))
IMAGE_DIR = "/var/lib/vmmiod/"


def parse(text: str, tmp_path: Path, **kw: object) -> c.Config:
    return load_text(text, "t.yaml", base_dir=tmp_path, **kw)  # type: ignore[arg-type]


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    cfg = parse("""
guest: {name: web1, domid: 7}
hypervisor: {kind: xen, interrupts: isa, grants: false, map_cache_pages: "0x1000",
             domain_wait: 2.5, backend_domid: 0}
log: {level: debug, format: json, stats_interval: 10, file: logs/web1.log}
devices:
  - type: block
    id: disk0
    mmio: {base: "0xfe000000", irq: "5", version: 1}
    path: disk.img
    readonly: true
    cache: none
    serial: WEB1-0
    queues: 2
    queue_size: 128
    lock: false
  - type: net
    id: net0
    mmio: {base: 4261413376, irq: 6}
    mac: 52:54:00:AB:cd:01
    mtu: 9000
    backend: {kind: tap, ifname: vif7, bridge: xenbr0, create: false}
  - type: console
    id: con0
    mmio: {base: 0xfe000400, irq: 7}
    cols: 132
    rows: 50
    queue_size: 32
    ports:
      - {name: console, backend: {kind: pty, link: /run/vmmiod/web1/console}}
      - {name: agent, backend: {kind: socket, path: agent.sock, takeover: yes}, buffer: 0x100}
      - {name: log, backend: {kind: file, path: /var/log/vmmiod/web1.log}}
""", tmp_path)
    assert cfg.guest == c.GuestConfig("web1", 7)
    assert cfg.hypervisor == c.XenConfig(interrupts="isa", grants=False, map_cache_pages=4096,
                                         domain_wait=2.5, backend_domid=0)
    assert cfg.log == c.LogConfig("debug", "json", 10.0, tmp_path / "logs/web1.log")
    blk, net, con = cfg.devices
    assert blk == c.BlockConfig(id="disk0", mmio=c.MmioConfig(0xFE000000, 5, 1),
                                path=tmp_path / "disk.img", readonly=True, cache="none",
                                serial="WEB1-0", queues=2, queue_size=128, lock=False)
    assert net == c.NetConfig(id="net0", mmio=c.MmioConfig(0xFE000200, 6),
                              backend=c.TapBackend("tap", "vif7", "xenbr0", False),
                              mac="52:54:00:ab:cd:01", mtu=9000)
    assert con.mmio == c.MmioConfig(0xFE000400, 7) and (con.cols, con.rows) == (132, 50)
    assert con.multiport is True  # forced on by more than one port
    assert con.ports == (
        c.ConsolePortConfig("console", c.PtyBackend(link=Path("/run/vmmiod/web1/console"))),
        c.ConsolePortConfig("agent", c.SocketBackend(path=tmp_path / "agent.sock",
                                                     takeover=True), buffer=256),
        c.ConsolePortConfig("log", c.FileBackend(path=Path("/var/log/vmmiod/web1.log"))),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.guest.name = "other"  # type: ignore[misc]


def test_shorthands_and_defaults(tmp_path: Path) -> None:
    cfg = parse("""
guest: g1
hypervisor: generic
devices:
  - {type: console, id: con0, mmio: {base: 0x1000, irq: 1}, backend: pty}
  - {type: net, id: net0, mmio: {base: 0x1200, irq: 2}, backend: tap}
  - type: net
    id: net1
    mmio: {base: 0x1400, irq: 3}
    backend: {kind: dgram, local: "unix:peer/a.sock", remote: "unix:/run/b.sock"}
  - type: net
    id: net2
    mmio: {base: 0x1600, irq: 4}
    backend: {kind: dgram, remote: "udp:[::1]:5556"}
""", tmp_path)
    assert cfg.guest == c.GuestConfig("g1", None)
    # No socket: the guest's runtime directory (writable under vmmiod@g1, unlike /run/vmmiod).
    assert cfg.hypervisor == c.GenericConfig(socket=Path("/run/vmmiod/g1/vmm.sock"))
    assert cfg.log == c.LogConfig()
    con, net0, net1, net2 = cfg.devices
    assert con.ports == (c.ConsolePortConfig("console", c.PtyBackend()),)
    assert con.multiport is False
    assert net0.backend == c.TapBackend()
    assert net1.backend == c.DgramBackend(
        local=c.SocketAddress("unix", path=tmp_path / "peer/a.sock"),
        remote=c.SocketAddress("unix", path=Path("/run/b.sock")))
    assert net2.backend == c.DgramBackend(remote=c.SocketAddress("udp", host="::1", port=5556))


@pytest.mark.parametrize("written", ["0x10000000", '"0x10000000"', '"268435456"', "268435456",
                                     "0x1000_0000", '" 0x10000000 "'])
def test_numbers_as_hex_or_decimal(tmp_path: Path, written: str) -> None:
    cfg = parse(f"""
guest: g1
hypervisor: generic
devices: [{{type: console, id: c, mmio: {{base: {written}, irq: 1}}, backend: pty}}]
""", tmp_path)
    assert cfg.devices[0].mmio.base == 0x10000000


@pytest.mark.parametrize("written", ["0600", '"0600"', '"0o600"', "600", '"600"', "0x180"])
def test_socket_mode_is_octal(tmp_path: Path, written: str) -> None:
    cfg = parse(f"""
guest: g1
hypervisor: {{kind: generic, socket_mode: {written}}}
devices: [{{type: console, id: c, mmio: {{base: 0x1000, irq: 1}}, backend: pty}}]
""", tmp_path)
    assert isinstance(cfg.hypervisor, c.GenericConfig)
    assert cfg.hypervisor.socket_mode == 0o600


@pytest.mark.parametrize("kind", ["generic", "vhost-user"])
def test_a_bare_socket_mode_is_read_as_chmod_reads_it(tmp_path: Path, kind: str) -> None:
    """`socket_mode: 440` is 0o440, as docs/configuration.md says file modes are octal; YAML
    reads the bare 440 as the decimal number 440, which vmmiod took as the mode 0o670 before
    (and 600 as out of range)."""
    device = ("{type: console, id: c, mmio: {base: 0x1000, irq: 1}, backend: pty}"
              if kind == "generic" else
              f"{{type: console, id: c, vhost_user: {tmp_path / 'c.sock'}, backend: pty}}")
    cfg = parse(f"""
guest: g1
hypervisor: {{kind: {kind}, socket_mode: 440}}
devices: [{device}]
""", tmp_path)
    assert isinstance(cfg.hypervisor, (c.GenericConfig, c.VhostUserConfig))
    assert cfg.hypervisor.socket_mode == 0o440


def test_auto_window_and_domid_with_xen(tmp_path: Path) -> None:
    cfg = parse("""
guest: {name: web1, domid: auto}
hypervisor: {kind: xen}
devices: [{type: console, id: c, mmio: auto, backend: pty}]
""", tmp_path)
    assert cfg.guest.domid is None
    assert cfg.devices[0].mmio == c.MmioConfig(base=None, irq=None, auto=True)


def test_merge_keys(tmp_path: Path) -> None:
    cfg = parse("""
guest: g1
hypervisor: generic
devices:
  - type: console
    id: c
    mmio: {base: 0x1000, irq: 1}
    ports:
      - &port {name: console, backend: pty, buffer: 1024}
      - {<<: *port, name: second}
""", tmp_path)
    assert [(p.name, p.buffer) for p in cfg.devices[0].ports] == [("console", 1024),
                                                                   ("second", 1024)]


def test_paths_expand_the_home_directory_unix_addresses_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/configuration.md: in paths `~` is expanded; a dgram `unix:~/...` address was taken
    relative to the config's folder instead (`<dir>/~/peer.sock`)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = parse("""
guest: g1
hypervisor: {kind: generic, socket: ~/vmm.sock}
devices:
  - {type: net, id: n0, mmio: {base: 0x1000, irq: 1},
     backend: {kind: dgram, local: "unix:~/n0.sock", remote: "unix:peer.sock"}}
""", tmp_path)
    assert isinstance(cfg.hypervisor, c.GenericConfig)
    assert cfg.hypervisor.socket == tmp_path / "home" / "vmm.sock"
    net = cfg.devices[0]
    assert isinstance(net, c.NetConfig) and isinstance(net.backend, c.DgramBackend)
    assert net.backend.local.path == tmp_path / "home" / "n0.sock"
    assert net.backend.remote is not None and net.backend.remote.path == tmp_path / "peer.sock"


def test_a_dgram_address_is_named_as_written(tmp_path: Path) -> None:
    """IPv6 in brackets, as configuration.md writes it, in problems and in `check`'s output."""
    text = """
guest: g1
hypervisor: generic
devices:
  - {type: net, id: n0, mmio: {base: 0x1000, irq: 1},
     backend: {kind: dgram, local: "udp:[::1]:5555", remote: "udp:[::1]:5556"}}
  - {type: net, id: n1, mmio: {base: 0x1200, irq: 2},
     backend: {kind: dgram, local: "udp:[::1]:5555"}}
"""
    with pytest.raises(ConfigError) as err:
        parse(text, tmp_path)
    assert err.value.problems == [("t.yaml:8: devices[1].backend.local: address "
                                   "udp:[::1]:5555 is already used by devices[0].backend.local "
                                   "(line 6)")]
    cfg = parse(text.replace("5555\"}}\n", "5557\"}}\n"), tmp_path)
    assert "dgram udp:[::1]:5555 -> udp:[::1]:5556," in describe(cfg)
    assert str(c.SocketAddress("unix", path=Path("/run/n.sock"))) == "unix:/run/n.sock"


def test_missing_image_is_skipped_without_file_checks(tmp_path: Path) -> None:
    text = """
guest: g1
hypervisor: generic
devices: [{type: block, id: d, mmio: {base: 0x1000, irq: 1}, path: nowhere.img}]
"""
    with pytest.raises(ConfigError):
        parse(text, tmp_path)
    assert parse(text, tmp_path, check_files=False).devices[0].path == tmp_path / "nowhere.img"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "absent.yaml")
    assert info.value.problems == [
        f"{tmp_path / 'absent.yaml'}:0: (file): cannot read it: No such file or directory"]


def test_read_only_image_may_be_shared(tmp_path: Path) -> None:
    (tmp_path / "base.img").write_bytes(b"")
    cfg = parse("""
guest: g1
hypervisor: generic
devices:
  - {type: block, id: a, mmio: {base: 0x1000, irq: 1}, path: base.img, readonly: true}
  - {type: block, id: b, mmio: {base: 0x1200, irq: 2}, path: ./base.img, readonly: true}
""", tmp_path)
    assert len(cfg.devices) == 2


# -- windows and IRQs: a property over random layouts ---------------------------------------------
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6)), min_size=1, max_size=8))
def test_every_window_and_irq_collision_is_reported(layout: list[tuple[int, int]]) -> None:
    lines = ["guest: g1", "hypervisor: generic", "devices:"]
    for i, (slot, irq) in enumerate(layout):
        lines.append(f"  - {{type: console, id: c{i}, mmio: {{base: {0x1000 + slot * 0x200:#x}, "
                     f"irq: {irq}}}, backend: pty}}")
    text = "\n".join(lines) + "\n"
    expected, bases, irqs = [], {}, {}
    for i, (slot, irq) in enumerate(layout):
        line = 4 + i
        if slot in bases:
            base = 0x1000 + slot * 0x200
            expected.append(f"t.yaml:{line}: devices[{i}].mmio.base: window {base:#x}-"
                            f"{base + 0x1ff:#x} overlaps devices[{bases[slot]}] "
                            f"('c{bases[slot]}') at {base:#x}")
        else:
            bases[slot] = i
        if irq in irqs:
            expected.append(f"t.yaml:{line}: devices[{i}].mmio.irq: irq {irq} is already used "
                            f"by devices[{irqs[irq]}] ('c{irqs[irq]}')")
        else:
            irqs[irq] = i
    try:
        load_text(text, "t.yaml")
        problems: list[str] = []
    except ConfigError as exc:
        problems = exc.problems
    assert problems == expected


# -- the shipped examples -------------------------------------------------------------------------
def with_images(example: Path, tmp_path: Path) -> Path:
    """The example with its image paths moved under tmp_path, where the images now exist."""
    text = example.read_text().replace(IMAGE_DIR, f"{tmp_path}/")
    for image in re.findall(rf"{re.escape(str(tmp_path))}/\S+\.img", text):
        Path(image).parent.mkdir(parents=True, exist_ok=True)
        Path(image).write_bytes(bytes(512))
    copy = tmp_path / example.name
    copy.write_text(text)
    return copy


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"xen-guest.yaml", "generic-guest.yaml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_check(example: Path, tmp_path: Path) -> None:
    copy = with_images(example, tmp_path)
    run = subprocess.run([sys.executable, "-m", "vmmiod", "check", str(copy)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    cfg = load(copy)
    for dev in cfg.devices:
        assert re.search(rf"^  {dev.id}\s+{dev.type}\s", run.stdout, re.MULTILINE), run.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_as_shipped_only_lacks_its_images(example: Path) -> None:
    """Unchanged, an example fails only for images absent on this machine: nothing else."""
    images = re.findall(rf"{IMAGE_DIR}\S+\.img", example.read_text())
    try:
        load(example)
        problems: list[str] = []
    except ConfigError as exc:
        problems = exc.problems
    missing = [i for i in images if not Path(i).exists()]
    assert len(problems) == len(missing)
    assert all("does not exist" in p for p in problems)
