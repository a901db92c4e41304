"""The configuration's schema: which keys each section has, what they mean, and the checks
that look across sections (duplicate ids, overlapping windows, IRQ reuse, shared resources).
The device sections are in configschema_devices.py, the shared helpers in configschema_base.py,
the vhost-user sections in configschema_vhost.py.

Every key is documented in docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from yaml.nodes import Node, ScalarNode

from vmmiod import configmodel as c
from vmmiod import configschema_devices as devs
from vmmiod import configschema_vhost as vhost
from vmmiod.configreader import Reader, child, line_of
from vmmiod.configschema_base import SchemaBase

TOP_KEYS = ("guest", "hypervisor", "log", "devices")
XEN_KEYS = ("interrupts", "grants", "map_cache_pages", "domain_wait", "backend_domid")
GENERIC_KEYS = ("socket", "on_disconnect", "socket_mode")
DEVICE_COMMON = ("id", "mmio", "vhost_user")
BLOCK_KEYS = ("path", "readonly", "cache", "serial", "queues", "queue_size", "lock", "io_engine",
              "io_poll_us")
NET_KEYS = ("backend", "mac", "mtu", "queue_size")
CONSOLE_KEYS = ("ports", "backend", "multiport", "cols", "rows", "queue_size")

DOMID_MAX = 0x7FEF  # DOMID_FIRST_RESERVED - 1
IRQ_MAX = 1019  # highest GIC SPI; also plenty for the generic channel's line numbers
ISA_IRQ_MAX = 15
SPI_FIRST = 32  # GIC SPIs start at 32 (0-31 are SGIs and PPIs)



class Schema(SchemaBase):
    """Turns the composed document into a `Config`, recording each problem on the reader."""

    def __init__(self, reader: Reader, check_files: bool) -> None:
        super().__init__(reader, check_files)
        self.kind: str | None = None  # hypervisor kind, once known
        self.socket_given = True  # False: the generic socket is derived from the guest's name
        self.interrupts = "auto"
        self.windows: list[tuple[int, str]] = []  # (base, "devices[i] ('id')")
        self.irqs: dict[int, str] = {}

    # -- sections -------------------------------------------------------------------------------
    def config(self, root: Node | None, path: Path) -> c.Config | None:
        r = self.r
        if root is None:
            r.problem(1, "", "the file is empty; expected a mapping with guest, hypervisor "
                             "and devices")
            return None
        top = r.mapping(root, "", TOP_KEYS, required=("guest", "hypervisor", "devices"))
        if top is None:
            return None
        hyp = self.hypervisor(top["hypervisor"]) if "hypervisor" in top else None
        guest = self.guest(top["guest"]) if "guest" in top else None
        if isinstance(hyp, c.GenericConfig) and guest is not None:
            hyp = self.generic_socket(hyp, guest.name, top["hypervisor"])
        log = self.log(top["log"]) if "log" in top else c.LogConfig()
        devices = self.devices(top["devices"]) if "devices" in top else ()
        if guest is None or hyp is None or log is None:
            return None
        return c.Config(path=path, guest=guest, hypervisor=hyp, log=log, devices=devices)

    def guest(self, node: Node) -> c.GuestConfig | None:
        r = self.r
        m = {"name": node} if isinstance(node, ScalarNode) else \
            r.mapping(node, "guest", ("name", "domid"), required=("name",))
        if m is None:
            return None
        name = self.r.name(m["name"], "guest.name") if "name" in m else None
        if name in (".", ".."):  # /run/vmmiod/<name>/ would be another directory
            r.problem(m["name"], "guest.name", f"{name!r} is not a valid name: it names the "
                                               "guest's directories (/run/vmmiod/<name>/)")
            name = None
        domid: int | None = None
        if "domid" in m and not r.is_word(m["domid"], "auto"):
            domid = r.integer(m["domid"], "guest.domid", 0, DOMID_MAX)
            if domid == 0 and self.kind == "xen":
                r.problem(m["domid"], "guest.domid",
                          "0 is dom0, where vmmiod runs; give the guest's domid or auto")
        self.guest_name = name
        return c.GuestConfig(name=name, domid=domid) if name is not None else None

    def hypervisor(self, node: Node) -> c.HypervisorConfig | None:
        r = self.r
        variants = {"xen": (XEN_KEYS, ()), "generic": (GENERIC_KEYS, ()),
                    vhost.KIND: (vhost.HYPERVISOR_KEYS, ())}
        kind, m = self.variant(node, "hypervisor", "kind", variants)
        if kind is None or m is None:
            return None
        self.kind = kind
        p = "hypervisor"
        if kind == vhost.KIND:
            return vhost.hypervisor(self, m)
        if kind == "xen":
            kw = self.fields(m, p, {
                "interrupts": lambda n, q: r.choice(n, q, ("auto", "spi", "isa", "msi")),
                "grants": self.r.bool_or_auto,
                "map_cache_pages": lambda n, q: r.integer(n, q, 16, 1 << 22),
                "domain_wait": lambda n, q: r.number(n, q, 0, 3600),
                "backend_domid": lambda n, q: r.integer(n, q, 0, DOMID_MAX),
            })
            self.interrupts = kw.get("interrupts", "auto")
            return c.XenConfig(**kw)
        kw = self.fields(m, p, {
            "socket": r.socket_path,
            "on_disconnect": lambda n, q: r.choice(n, q, ("wait", "exit")),
            "socket_mode": r.file_mode,
        })
        if "socket" in kw:
            self.claim("path", str(kw["socket"]), m["socket"], child(p, "socket"))
        else:
            self.socket_given = False
        return c.GenericConfig(**kw)

    def generic_socket(self, hyp: c.GenericConfig, guest: str, node: Node) -> c.GenericConfig:
        """No `socket`: the guest's runtime directory, the one writable place in /run under the
        template unit (vmmiod@<guest>: RuntimeDirectory=vmmiod/%i) and the state record's."""
        if self.socket_given:
            return hyp
        sock = c.GENERIC_RUN_DIR / guest / c.GENERIC_SOCKET_NAME
        self.claim("path", str(sock), node, child("hypervisor", "socket"))
        return dataclasses.replace(hyp, socket=sock)

    def log(self, node: Node) -> c.LogConfig | None:
        r = self.r
        m = r.mapping(node, "log", ("level", "format", "stats_interval", "file"))
        if m is None:
            return None
        kw = self.fields(m, "log", {
            "level": lambda n, q: r.choice(n, q, ("debug", "info", "warning", "error")),
            "format": lambda n, q: r.choice(n, q, ("auto", "json", "console")),
            "stats_interval": lambda n, q: r.number(n, q, 0, 86400),
            "file": r.path,
        })
        return c.LogConfig(**kw)

    # -- devices --------------------------------------------------------------------------------
    def devices(self, node: Node) -> tuple[c.DeviceConfig, ...]:
        r = self.r
        items = r.sequence(node, "devices")
        if items is None:
            return ()
        if not items:
            r.problem(node, "devices", "the list is empty; a guest needs at least one device")
        variants = {  # mmio or vhost_user, by hypervisor kind: checked in device_transport
            "block": ((*DEVICE_COMMON, *BLOCK_KEYS), ("id", "path")),
            "net": ((*DEVICE_COMMON, *NET_KEYS), ("id", "backend")),
            "console": ((*DEVICE_COMMON, *CONSOLE_KEYS), ("id",)),
        }
        out: list[c.DeviceConfig] = []
        ids: dict[str, int] = {}
        for i, item in enumerate(items):
            path = child("devices", i)
            kind, m = self.variant(item, path, "type", variants, shorthand=False)
            if kind is None or m is None:
                continue
            dev_id = self.r.ident(m["id"], child(path, "id")) if "id" in m else None
            if dev_id is not None:
                if dev_id in ids:
                    r.problem(m["id"], child(path, "id"),
                              f"duplicate device id {dev_id!r} (first at line {ids[dev_id]})")
                else:
                    ids[dev_id] = line_of(m["id"])
            transport_ok, endpoint = vhost.device_transport(self, m, item, path)
            mmio = self.mmio(m["mmio"], child(path, "mmio"), dev_id or "?") \
                if "mmio" in m and self.kind != vhost.KIND else None
            if endpoint is not None:
                mmio = c.NO_WINDOW
            if not transport_ok:
                mmio = None
            dev: c.DeviceConfig | None = None
            if kind == "block":
                dev = devs.block(self, m, path, dev_id, mmio)
            elif kind == "net":
                dev = devs.net(self, m, path, dev_id, mmio)
            else:
                dev = devs.console(self, item, m, path, dev_id, mmio)
            if dev is not None:
                out.append(dataclasses.replace(dev, vhost_user=endpoint) if endpoint else dev)
        devs.tap_bridges(self)
        return tuple(out)

    def mmio(self, node: Node, path: str, dev_id: str) -> c.MmioConfig | None:
        r = self.r
        if r.is_word(node, "auto"):
            if self.kind not in ("xen", None):
                r.problem(node, path, "auto needs hypervisor kind xen (windows are read from "
                                      "xenstore); give {base: ..., irq: ...}")
                return None
            return c.MmioConfig(base=None, irq=None, auto=True)
        m = r.mapping(node, path, ("base", "irq", "version"), required=("base", "irq"))
        if m is None:
            return None
        base = r.integer(m["base"], child(path, "base"), 0, (1 << 64) - c.MMIO_WINDOW_SIZE) \
            if "base" in m else None
        if base is not None and base % c.MMIO_WINDOW_SIZE:
            r.problem(m["base"], child(path, "base"),
                      f"{base:#x} is not aligned to {c.MMIO_WINDOW_SIZE:#x}")
            base = None
        lo, hi = 0, IRQ_MAX
        if self.kind == "xen" and self.interrupts == "isa":
            hi = ISA_IRQ_MAX
        elif self.kind == "xen" and self.interrupts == "spi":
            lo = SPI_FIRST
        irq = r.integer(m["irq"], child(path, "irq"), lo, hi) if "irq" in m else None
        owner = f"{path.rsplit('.', 1)[0]} ({dev_id!r})"
        if base is not None:
            self.check_window(m["base"], child(path, "base"), base, owner)
        if irq is not None:
            if irq in self.irqs:
                r.problem(m["irq"], child(path, "irq"), f"irq {irq} is already used by "
                                                        f"{self.irqs[irq]}")
            else:
                self.irqs[irq] = owner
        version = r.integer(m["version"], child(path, "version"), 1, 2) if "version" in m else 2
        if base is None or irq is None or version is None:
            return None
        return c.MmioConfig(base=base, irq=irq, version=2 if version == 2 else 1)

    def check_window(self, node: Node, path: str, base: int, owner: str) -> None:
        end = base + c.MMIO_WINDOW_SIZE - 1
        for other_base, other in self.windows:
            if other_base <= end and base <= other_base + c.MMIO_WINDOW_SIZE - 1:
                self.r.problem(node, path, f"window {base:#x}-{end:#x} overlaps {other} "
                                           f"at {other_base:#x}")
                return
        self.windows.append((base, owner))
