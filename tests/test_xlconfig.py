"""`vmmiod check` prints the xl lines that give a Xen guest the windows its YAML expects."""

from __future__ import annotations

from pathlib import Path

from vmmiod.cli import describe
from vmmiod.config import (
    BlockConfig,
    Config,
    ConsoleConfig,
    GuestConfig,
    LogConfig,
    MmioConfig,
    XenConfig,
    load,
)
from vmmiod.xlconfig import slots, xl_lines

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_lines_match_its_windows() -> None:
    config = load(ROOT / "config" / "xen-guest.yaml", check_files=False)
    lines = xl_lines(config)
    disk = [line for line in lines if "specification=virtio" in line]
    assert len(disk) == 3
    assert "vdev=xvda" in disk[0] and "# disk0 (block) -> 0x2000000 irq 33" in disk[0]
    assert "vdev=xvdb" in disk[1] and "target=/var/lib/vmmiod/windows/web1-net0" in disk[1]
    assert "# con0 (console) -> 0x2000400 irq 35" in disk[2]
    assert all(line.index("target=") > line.index("vdev=") for line in disk)  # target last
    generic = [line for line in lines if "type=virtio,device" in line]
    assert [g.split("device")[1][0] for g in generic] == ["2", "1", "3"]
    assert not [line for line in lines if line.startswith("warning")]
    assert "xl config, Xen 4.17" in describe(config)


def _config(*devices: tuple[str, int | None, int | None]) -> Config:
    devs = tuple(BlockConfig(id=i, mmio=MmioConfig(base=b, irq=q, auto=b is None),
                             path=Path(f"/img/{i}")) for i, b, q in devices)
    return Config(path=Path("g.yaml"), guest=GuestConfig(name="g"), hypervisor=XenConfig(),
                  log=LogConfig(), devices=devs)


def test_auto_devices_fill_the_free_windows_in_order() -> None:
    found, problems = slots(_config(("a", None, None), ("b", 0x2000000, 33), ("c", None, None)))
    assert found == [(0, "b", "block"), (1, "a", "block"), (2, "c", "block")]
    assert problems == []


def test_windows_xl_cannot_give_are_reported() -> None:
    _found, problems = slots(_config(("a", 0x2000000, 40), ("b", 0x3000000, 50)))
    assert any("irq 33, the YAML says 40" in p for p in problems)
    assert any("never allots a window at 0x3000000" in p for p in problems)
    _found, problems = slots(_config(("a", 0x2000400, 35)))
    assert any("used by no device" in p for p in problems)
    assert any(line.startswith("warning") for line in xl_lines(_config(("a", 0x2000000, 40))))


def test_console_gets_a_placeholder_target() -> None:
    cfg = load(ROOT / "config" / "xen-guest-auto.yaml", check_files=False)
    assert isinstance(cfg.devices[-1], ConsoleConfig)
    lines = xl_lines(cfg)
    assert any("placeholder targets are empty files" in line for line in lines)
