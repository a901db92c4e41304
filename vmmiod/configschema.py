"""The configuration's schema: which keys each section has, what they mean, and the checks
that look across sections (duplicate ids, overlapping windows, IRQ reuse, shared resources).

Every key is documented in docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode

from vmmiod import configmodel as c
from vmmiod import configschema_vhost as vhost
from vmmiod.configreader import TAG_STR, Reader, child, line_of

Read = Callable[[Node, str], Any]

TOP_KEYS = ("guest", "hypervisor", "log", "devices")
XEN_KEYS = ("interrupts", "grants", "map_cache_pages", "domain_wait", "backend_domid")
GENERIC_KEYS = ("socket", "on_disconnect", "socket_mode")
DEVICE_COMMON = ("id", "mmio", "vhost_user")
BLOCK_KEYS = ("path", "readonly", "cache", "serial", "queues", "queue_size", "lock", "io_engine")
NET_KEYS = ("backend", "mac", "mtu", "queue_size")
CONSOLE_KEYS = ("ports", "backend", "multiport", "cols", "rows", "queue_size")

DOMID_MAX = 0x7FEF  # DOMID_FIRST_RESERVED - 1
IRQ_MAX = 1019  # highest GIC SPI; also plenty for the generic channel's line numbers
ISA_IRQ_MAX = 15
SPI_FIRST = 32  # GIC SPIs start at 32 (0-31 are SGIs and PPIs)
CONSOLE_PORTS_MAX = 32
CONSOLE_BUFFER_MAX = 64 << 20
UDP_PAYLOAD_MAX = 65507
ETH_HLEN = 14



def peek(node: Node, key: str) -> Node | None:
    """The value of `key` in a mapping node, before the mapping itself is checked."""
    if isinstance(node, MappingNode):
        for k, v in node.value:
            if isinstance(k, ScalarNode) and k.value == key and isinstance(v, Node):
                return v
    return None


class Schema:
    """Turns the composed document into a `Config`, recording each problem on the reader."""

    def __init__(self, reader: Reader, check_files: bool) -> None:
        self.r = reader
        self.check_files = check_files
        self.kind: str | None = None  # hypervisor kind, once known
        self.interrupts = "auto"
        self.claims: dict[tuple[str, str], tuple[str, int]] = {}
        self.images: dict[str, tuple[str, int, bool]] = {}
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
        domid: int | None = None
        if "domid" in m and not r.is_word(m["domid"], "auto"):
            domid = r.integer(m["domid"], "guest.domid", 0, DOMID_MAX)
            if domid == 0 and self.kind == "xen":
                r.problem(m["domid"], "guest.domid",
                          "0 is dom0, where vmmiod runs; give the guest's domid or auto")
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
            "socket": r.path,
            "on_disconnect": lambda n, q: r.choice(n, q, ("wait", "exit")),
            "socket_mode": lambda n, q: r.integer(n, q, 0, 0o777, octal_strings=True),
        })
        sock = kw.get("socket", c.GenericConfig.socket)
        self.claim("path", str(sock), m.get("socket", node), child(p, "socket"))
        return c.GenericConfig(**kw)

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
                dev = self.block(m, path, dev_id, mmio)
            elif kind == "net":
                dev = self.net(m, path, dev_id, mmio)
            else:
                dev = self.console(item, m, path, dev_id, mmio)
            if dev is not None:
                out.append(dataclasses.replace(dev, vhost_user=endpoint) if endpoint else dev)
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

    def block(self, m: dict[str, Node], path: str, dev_id: str | None,
              mmio: c.MmioConfig | None) -> c.BlockConfig | None:
        r = self.r
        kw = self.fields(m, path, {
            "path": r.path, "readonly": r.boolean, "lock": r.boolean,
            "cache": lambda n, q: r.choice(n, q, ("writeback", "writethrough", "none")),
            "serial": lambda n, q: self.r.serial(n, q),
            "queues": lambda n, q: r.integer(n, q, 1, 64),
            "queue_size": self.r.queue_size,
            "io_engine": lambda n, q: r.choice(n, q, ("auto", "io_uring", "threads", "sync")),
        })
        image = kw.get("path")
        if image is not None:
            self.image(m["path"], child(path, "path"), image, bool(kw.get("readonly", False)))
        if dev_id is None or mmio is None or image is None:
            return None
        return c.BlockConfig(id=dev_id, mmio=mmio, **kw)

    def net(self, m: dict[str, Node], path: str, dev_id: str | None,
            mmio: c.MmioConfig | None) -> c.NetConfig | None:
        r = self.r
        kw = self.fields(m, path, {
            "mac": self.r.mac, "mtu": lambda n, q: r.integer(n, q, 68, 65535),
            "queue_size": self.r.queue_size,
        })
        backend = self.net_backend(m["backend"], child(path, "backend")) if "backend" in m else None
        if isinstance(backend, c.DgramBackend) and backend.local.family == "udp" \
                and kw.get("mtu", 1500) + ETH_HLEN > UDP_PAYLOAD_MAX:
            r.problem(m["mtu"], child(path, "mtu"), f"a UDP datagram carries at most "
                      f"{UDP_PAYLOAD_MAX - ETH_HLEN} bytes of frame payload")
        if dev_id is None or mmio is None or backend is None:
            return None
        return c.NetConfig(id=dev_id, mmio=mmio, backend=backend, **kw)

    def net_backend(self, node: Node, path: str) -> c.NetBackend | None:
        r = self.r
        variants = {"tap": (("ifname", "bridge", "create"), ()), "dgram": (("local", "remote"), ())}
        kind, m = self.variant(node, path, "kind", variants)
        if kind is None or m is None:
            return None
        if kind == "tap":
            kw = self.fields(m, path, {"ifname": self.r.ifname, "bridge": self.r.ifname,
                                       "create": r.boolean})
            if "ifname" in kw:
                self.claim("interface", kw["ifname"], m["ifname"], child(path, "ifname"))
            return c.TapBackend(**kw)
        kw = self.fields(m, path, {"local": self.r.address, "remote": self.r.address})
        local, remote = kw.get("local"), kw.get("remote")
        if local is not None and (local.port or local.path):
            self.claim("address", f"{local.family}:{local.host}:{local.port}:{local.path}",
                       m["local"], child(path, "local"))
        if local is not None and remote is not None and local.family != remote.family:
            r.problem(m["remote"], child(path, "remote"),
                      f"remote is {remote.family} but local is {local.family}")
        return c.DgramBackend(**kw)

    def console(self, node: Node, m: dict[str, Node], path: str, dev_id: str | None,
                mmio: c.MmioConfig | None) -> c.ConsoleConfig | None:
        r = self.r
        kw = self.fields(m, path, {
            "multiport": r.boolean, "cols": lambda n, q: r.integer(n, q, 1, 65535),
            "rows": lambda n, q: r.integer(n, q, 1, 65535), "queue_size": self.r.queue_size,
        })
        ports: list[c.ConsolePortConfig] | None = None
        if "ports" in m and "backend" in m:
            r.problem(m["backend"], child(path, "backend"),
                      "give either ports (a list) or backend (one port named console), not both")
        elif "ports" in m:
            ports = self.ports(m["ports"], child(path, "ports"))
        elif "backend" in m:  # shorthand: one port named "console"
            backend = self.console_backend(m["backend"], child(path, "backend"))
            ports = [c.ConsolePortConfig("console", backend)] if backend is not None else None
        else:
            r.problem(node, child(path, "ports"),
                      "missing required key (or backend: for a single port)")
        if ports is not None and len(ports) > 1:
            if kw.get("multiport") is False:
                r.problem(m["multiport"], child(path, "multiport"),
                          f"false, but {len(ports)} ports need multiport")
            kw["multiport"] = True
        if dev_id is None or mmio is None or not ports:
            return None
        return c.ConsoleConfig(id=dev_id, mmio=mmio, ports=tuple(ports), **kw)

    def ports(self, node: Node, path: str) -> list[c.ConsolePortConfig] | None:
        r = self.r
        items = r.sequence(node, path)
        if items is None:
            return None
        if not items or len(items) > CONSOLE_PORTS_MAX:
            r.problem(node, path, f"expected 1 to {CONSOLE_PORTS_MAX} ports, got {len(items)}")
            return None
        out: list[c.ConsolePortConfig] = []
        names: dict[str, int] = {}
        ok = True
        for i, item in enumerate(items):
            p = child(path, i)
            m = r.mapping(item, p, ("name", "backend", "buffer"), required=("name", "backend"))
            if m is None:
                ok = False
                continue
            name = self.r.name(m["name"], child(p, "name")) if "name" in m else None
            if name is not None and name in names:
                r.problem(m["name"], child(p, "name"),
                          f"duplicate port name {name!r} (first at line {names[name]})")
            elif name is not None:
                names[name] = line_of(m["name"])
            backend = self.console_backend(m["backend"], child(p, "backend")) \
                if "backend" in m else None
            kw = self.fields(m, p, {"buffer": lambda n, q: r.integer(n, q, 0, CONSOLE_BUFFER_MAX)})
            if name is None or backend is None:
                ok = False
                continue
            out.append(c.ConsolePortConfig(name=name, backend=backend, **kw))
        return out if ok else None

    def console_backend(self, node: Node, path: str) -> c.ConsoleBackend | None:
        r = self.r
        variants = {"pty": (("link",), ()), "socket": (("path", "takeover"), ("path",)),
                    "file": (("path",), ("path",))}
        kind, m = self.variant(node, path, "kind", variants)
        if kind is None or m is None:
            return None
        kw = self.fields(m, path, {"link": r.path, "path": r.path, "takeover": r.boolean})
        for key in ("link", "path"):
            if key in kw:
                self.claim("path", str(kw[key]), m[key], child(path, key))
        if kind == "pty":
            return c.PtyBackend(**kw)
        if "path" not in kw:
            return None
        return c.SocketBackend(**kw) if kind == "socket" else c.FileBackend(**kw)

    # -- shared helpers ---------------------------------------------------------------------------
    def variant(self, node: Node, path: str, tag_key: str,
                variants: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]],
                *, shorthand: bool = True) -> tuple[str | None, dict[str, Node] | None]:
        """A mapping whose `tag_key` (kind, type) selects its other keys; `kind: x` may be
        written as the bare string `x` when `shorthand`."""
        r = self.r
        union = tuple(dict.fromkeys(k for keys, _ in variants.values() for k in keys))
        if shorthand and isinstance(node, ScalarNode) and node.tag == TAG_STR:
            kind = r.choice(node, path, tuple(variants))
            if kind is not None:
                for key in variants[kind][1]:
                    r.problem(node, child(path, key),
                              f"missing required key (kind {kind} needs it: write "
                              f"{{kind: {kind}, {key}: ...}})")
            return kind, {}
        if not isinstance(node, MappingNode):
            r.mapping(node, path, ())  # records "expected a mapping"
            return None, None
        tag_node = peek(node, tag_key)
        kind = r.choice(tag_node, child(path, tag_key), tuple(variants)) \
            if tag_node is not None else None
        if kind is None:
            r.mapping(node, path, (tag_key, *union), required=(tag_key,))
            return None, None
        allowed, required = variants[kind]
        elsewhere = {k: f"{tag_key} " + " or ".join(n for n, (ks, _) in variants.items() if k in ks)
                     for k in union if k not in allowed}
        return kind, r.mapping(node, path, (tag_key, *allowed), required, elsewhere=elsewhere)

    def fields(self, m: dict[str, Node], path: str, spec: dict[str, Read]) -> dict[str, Any]:
        """Read the optional keys of `spec` that are present; bad ones are left out."""
        out: dict[str, Any] = {}
        for key, read in spec.items():
            if key in m:
                value = read(m[key], child(path, key))
                if value is not None:
                    out[key] = value
        return out

    def claim(self, what: str, key: str, node: Node, path: str) -> None:
        """Resources two devices must not share (socket and file paths, interfaces, ports)."""
        prev = self.claims.get((what, key))
        if prev is not None:
            self.r.problem(node, path, f"{what} {key} is already used by {prev[0]} "
                                       f"(line {prev[1]})")
        else:
            self.claims[(what, key)] = (path, line_of(node))

    def image(self, node: Node, path: str, image: Path, readonly: bool) -> None:
        r = self.r
        real = os.path.realpath(image)
        prev = self.images.get(real)
        if prev is not None and not (readonly and prev[2]):
            r.problem(node, path, f"{image} is also served by {prev[0]} (line {prev[1]}); "
                                  "two devices may share an image only when both are readonly")
        self.images.setdefault(real, (path.rsplit(".", 1)[0], line_of(node), readonly))
        if not self.check_files:
            return
        try:
            st = os.stat(image)
        except FileNotFoundError:
            r.problem(node, path, f"backing file {image} does not exist")
            return
        except OSError as exc:
            r.problem(node, path, f"cannot look at backing file {image}: {exc.strerror}")
            return
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            r.problem(node, path, f"{image} is neither a regular file nor a block device")
        elif not os.access(image, os.R_OK):
            r.problem(node, path, f"{image} is not readable")
        elif not readonly and not os.access(image, os.W_OK):
            r.problem(node, path, f"{image} is not writable (set readonly: true to serve it "
                                  "read-only)")
