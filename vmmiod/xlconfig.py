"""The xl `disk = [...]` / `virtio = [...]` lines that give a guest the windows its YAML expects
(what `vmmiod check` prints for a Xen guest; see docs/xen.md).

xl (libxl, Arm) allots virtio-mmio windows of 0x200 bytes from 0x2000000 upward and SPIs from
33, one per virtio device in order of declaration, disks first. So the k-th virtio disk gets
0x2000000 + k * 0x200 and irq 33 + k. Xen 4.17 knows only virtio *disks*; a disk window can
serve any device type (the guest binds its driver by the DeviceID register), and libxl stats a
disk's `target`, so net and console windows name an empty placeholder file. Xen >= 4.18 also
has generic devices, `virtio = [ "type=virtio,device<id>, transport=mmio" ]`.
"""

from __future__ import annotations

from vmmiod.config import MMIO_WINDOW_SIZE, Config

XL_FIRST_BASE = 0x2000000
XL_FIRST_IRQ = 33
XL_MAX_WINDOWS = 11  # SPIs 33..43
DEVICE_IDS = {"net": 1, "block": 2, "console": 3}
VD = "backendtype=standalone, specification=virtio, format=raw"
PLACEHOLDER_DIR = "/var/lib/vmmiod/windows"


def slots(config: Config) -> tuple[list[tuple[int, str, str]], list[str]]:
    """[(slot, device id, type)] in slot order, and the problems xl could not satisfy."""
    taken: dict[int, tuple[str, str]] = {}
    problems = []
    for dev in config.devices:
        m = dev.mmio
        if m.auto or m.base is None:
            continue
        k, rest = divmod(m.base - XL_FIRST_BASE, MMIO_WINDOW_SIZE)
        if m.base < XL_FIRST_BASE or rest or k >= XL_MAX_WINDOWS:
            problems.append(f"device {dev.id!r}: xl never allots a window at {m.base:#x} (it "
                            f"uses {XL_FIRST_BASE:#x} + k * {MMIO_WINDOW_SIZE:#x}, k < "
                            f"{XL_MAX_WINDOWS})")
            continue
        if m.irq != XL_FIRST_IRQ + k:
            problems.append(f"device {dev.id!r}: xl gives the window at {m.base:#x} irq "
                            f"{XL_FIRST_IRQ + k}, the YAML says {m.irq}")
        taken[k] = (dev.id, dev.type)
    free = (k for k in range(XL_MAX_WINDOWS) if k not in taken)
    for dev in config.devices:
        if dev.mmio.auto:
            slot = next(free, None)
            if slot is None:
                problems.append(f"device {dev.id!r}: xl has no window left (at most "
                                f"{XL_MAX_WINDOWS})")
                continue
            taken[slot] = (dev.id, dev.type)
    out = [(k, *taken[k]) for k in sorted(taken)]
    gaps = [k for k in range(len(out)) if k not in taken]
    if gaps:
        where = ", ".join(f"{XL_FIRST_BASE + k * MMIO_WINDOW_SIZE:#x}" for k in gaps)
        problems.append(f"windows {where} are used by no device: declare a placeholder disk "
                        "for each, or xl shifts every later window")
    return out, problems


def xl_lines(config: Config) -> list[str]:
    """What `vmmiod check` prints after the devices."""
    by_id = {d.id: d for d in config.devices}
    found, problems = slots(config)
    if not found:
        return []
    last = found[-1][0]
    name = config.guest.name
    disks = []
    generic = []
    for k in range(last + 1):
        entry = next((f for f in found if f[0] == k), None)
        vdev = f"xvd{chr(ord('a') + k)}"
        where = f"{XL_FIRST_BASE + k * MMIO_WINDOW_SIZE:#x} irq {XL_FIRST_IRQ + k}"
        if entry is None:
            text = f"{VD}, vdev={vdev}, access=rw, target={PLACEHOLDER_DIR}/{name}-gap{k}"
            disks.append((text, f"unused window {where} (placeholder)"))
            continue
        _k, dev_id, dtype = entry
        dev = by_id[dev_id]
        if dtype == "block":
            access = "ro" if getattr(dev, "readonly", False) else "rw"
            target = str(getattr(dev, "path", ""))
        else:
            access, target = "rw", f"{PLACEHOLDER_DIR}/{name}-{dev_id}"
        disks.append((f"{VD}, vdev={vdev}, access={access}, target={target}",
                      f"{dev_id} ({dtype}) -> {where}"))
        grants = 1 if getattr(config.hypervisor, "grants", False) is True else 0
        backend = getattr(config.hypervisor, "backend_domid", 0)
        text = (f"backend={backend}, type=virtio,device{DEVICE_IDS[dtype]}, transport=mmio, "
                f"grant_usage={grants}")
        generic.append((text, f"{dev_id} -> {where}"))
    lines = ["xl config, Xen 4.17 (virtio disks, in this order, before any other virtio disk):",
             "  disk = ["]
    for i, (text, note) in enumerate(disks):
        comma = "," if i < len(disks) - 1 else ""
        lines.append(f'    "{text}"{comma}  # {note}')
    lines.append("  ]")
    placeholders = [d for d, n in disks if PLACEHOLDER_DIR in d]
    if placeholders:
        lines.append(f"  (placeholder targets are empty files: mkdir -p {PLACEHOLDER_DIR} && "
                     "touch them; libxl only checks that they exist)")
    if len(generic) == len(disks):
        lines.append("xl config, Xen >= 4.18 (generic virtio devices, no other virtio device "
                     "before them):")
        lines.append("  virtio = [")
        for i, (text, note) in enumerate(generic):
            comma = "," if i < len(generic) - 1 else ""
            lines.append(f'    "{text}"{comma}  # {note}')
        lines.append("  ]")
    lines += [f"warning: {p}" for p in problems]
    return lines
