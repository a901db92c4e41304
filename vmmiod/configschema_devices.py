"""The device sections of the configuration schema (docs/configuration.md): block, net with its
TAP or dgram backend, console with its ports and backends, and the backing-image checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from yaml.nodes import Node

from vmmiod import configmodel as c
from vmmiod.configreader import child, line_of
from vmmiod.configschema_base import SchemaBase
from vmmiod.ifnames import default_ifname

CONSOLE_PORTS_MAX = 32
CONSOLE_BUFFER_MAX = 64 << 20
UDP_PAYLOAD_MAX = 65507
ETH_HLEN = 14


def block(s: SchemaBase, m: dict[str, Node], path: str, dev_id: str | None,
          mmio: c.MmioConfig | None) -> c.BlockConfig | None:
    r = s.r
    kw = s.fields(m, path, {
        "path": r.path, "readonly": r.boolean, "lock": r.boolean,
        "cache": lambda n, q: r.choice(n, q, ("writeback", "writethrough", "none")),
        "serial": lambda n, q: r.serial(n, q),
        "queues": lambda n, q: r.integer(n, q, 1, 64),
        "queue_size": r.queue_size,
        "io_engine": lambda n, q: r.choice(n, q, ("auto", "io_uring", "threads", "sync")),
        "io_poll_us": lambda n, q: r.integer(n, q, 0, 1000),
    })
    image = kw.get("path")
    if image is not None:
        check_image(s, m["path"], child(path, "path"), image, bool(kw.get("readonly", False)))
    if dev_id is None or mmio is None or image is None:
        return None
    return c.BlockConfig(id=dev_id, mmio=mmio, **kw)


def net(s: SchemaBase, m: dict[str, Node], path: str, dev_id: str | None,
        mmio: c.MmioConfig | None) -> c.NetConfig | None:
    r = s.r
    kw = s.fields(m, path, {
        "mac": r.mac, "mtu": lambda n, q: r.integer(n, q, 68, 65535),
        "queue_size": r.queue_size,
    })
    backend = net_backend(s, m["backend"], child(path, "backend"), dev_id) \
        if "backend" in m else None
    if isinstance(backend, c.DgramBackend) and backend.local.family == "udp" \
            and kw.get("mtu", 1500) + ETH_HLEN > UDP_PAYLOAD_MAX:
        r.problem(m["mtu"], child(path, "mtu"), f"a UDP datagram carries at most "
                  f"{UDP_PAYLOAD_MAX - ETH_HLEN} bytes of frame payload")
    if dev_id is None or mmio is None or backend is None:
        return None
    return c.NetConfig(id=dev_id, mmio=mmio, backend=backend, **kw)


def net_backend(s: SchemaBase, node: Node, path: str, dev_id: str | None) -> c.NetBackend | None:
    r = s.r
    variants = {"tap": (("ifname", "bridge", "create"), ()), "dgram": (("local", "remote"), ())}
    kind, m = s.variant(node, path, "kind", variants)
    if kind is None or m is None:
        return None
    if kind == "tap":
        kw = s.fields(m, path, {"ifname": r.ifname, "bridge": r.ifname,
                                   "create": r.boolean})
        if "bridge" in kw:  # (checked once every TAP has claimed its name: tap_bridges)
            s.bridges.append((kw["bridge"], m["bridge"], child(path, "bridge")))
        if "ifname" in kw:
            s.claim("interface", kw["ifname"], m["ifname"], child(path, "ifname"))
        elif s.guest_name is not None and dev_id is not None:
            default_tap_name(s, default_ifname(s.guest_name, dev_id), node, path)
        return c.TapBackend(**kw)
    kw = s.fields(m, path, {"local": r.address, "remote": r.address})
    local, remote = kw.get("local"), kw.get("remote")
    if local is not None and local.path is not None:  # a socket file: no other may use it
        s.claim("path", str(local.path), m["local"], child(path, "local"))
    elif local is not None and local.port:
        s.claim("address", str(local), m["local"], child(path, "local"))
    if local is not None and remote is not None and local.family != remote.family:
        r.problem(m["remote"], child(path, "remote"),
                  f"remote is {remote.family} but local is {local.family}")
    return c.DgramBackend(**kw)


def tap_bridges(s: SchemaBase) -> None:
    """A TAP's bridge must not be the TAP of a device in this file (its ifname or default name),
    before or after it: a TAP is not a bridge to enslave another interface to. Run once every
    device has claimed its interface."""
    for name, node, path in s.bridges:
        prev = s.claims.get(("interface", name))
        if prev is not None:
            s.r.problem(node, path, f"{name!r} names a TAP of this file ({prev[0]}, line {prev[1]}), "
                                    "not a bridge")


def default_tap_name(s: SchemaBase, name: str, node: Node, path: str) -> None:
    """A TAP without `ifname` takes `<guest>-<id>`: claimed like a given name, so a device that
    names the same interface (before or after this one) is reported."""
    prev = s.claims.get(("interface", name))
    if prev is not None:
        s.r.problem(node, path, f"no ifname given, and the default {name!r} (<guest>-<id>) is "
                                f"already used by {prev[0]} (line {prev[1]}): give an ifname")
    else:
        s.claims[("interface", name)] = (f"{path} (its default ifname)", line_of(node))


def console(s: SchemaBase, node: Node, m: dict[str, Node], path: str, dev_id: str | None,
            mmio: c.MmioConfig | None) -> c.ConsoleConfig | None:
    r = s.r
    kw = s.fields(m, path, {
        "multiport": r.boolean, "cols": lambda n, q: r.integer(n, q, 1, 65535),
        "rows": lambda n, q: r.integer(n, q, 1, 65535), "queue_size": r.queue_size,
    })
    ports: list[c.ConsolePortConfig] | None = None
    if "ports" in m and "backend" in m:
        r.problem(m["backend"], child(path, "backend"),
                  "give either ports (a list) or backend (one port named console), not both")
    elif "ports" in m:
        ports = console_ports(s, m["ports"], child(path, "ports"))
    elif "backend" in m:  # shorthand: one port named "console"
        backend = console_backend(s, m["backend"], child(path, "backend"))
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


def console_ports(s: SchemaBase, node: Node, path: str) -> list[c.ConsolePortConfig] | None:
    r = s.r
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
        name = r.name(m["name"], child(p, "name")) if "name" in m else None
        if name is not None and name in names:
            r.problem(m["name"], child(p, "name"),
                      f"duplicate port name {name!r} (first at line {names[name]})")
        elif name is not None:
            names[name] = line_of(m["name"])
        backend = console_backend(s, m["backend"], child(p, "backend")) \
            if "backend" in m else None
        kw = s.fields(m, p, {"buffer": lambda n, q: r.integer(n, q, 0, CONSOLE_BUFFER_MAX)})
        if name is None or backend is None:
            ok = False
            continue
        out.append(c.ConsolePortConfig(name=name, backend=backend, **kw))
    return out if ok else None


def console_backend(s: SchemaBase, node: Node, path: str) -> c.ConsoleBackend | None:
    r = s.r
    variants = {"pty": (("link",), ()), "socket": (("path", "takeover"), ("path",)),
                "file": (("path",), ("path",))}
    kind, m = s.variant(node, path, "kind", variants)
    if kind is None or m is None:
        return None
    kw = s.fields(m, path, {"link": r.path, "takeover": r.boolean,
                            "path": r.socket_path if kind == "socket" else r.path})
    for key in ("link", "path"):
        if key in kw:
            s.claim("path", str(kw[key]), m[key], child(path, key))
    if kind == "pty":
        return c.PtyBackend(**kw)
    if "path" not in kw:
        return None
    return c.SocketBackend(**kw) if kind == "socket" else c.FileBackend(**kw)


def check_image(s: SchemaBase, node: Node, path: str, image: Path, readonly: bool) -> None:
    r = s.r
    real = os.path.realpath(image)
    prev = s.images.get(real)
    if prev is not None and not (readonly and prev[2]):
        r.problem(node, path, f"{image} is also served by {prev[0]} (line {prev[1]}); "
                              "two devices may share an image only when both are readonly")
    s.images.setdefault(real, (path.rsplit(".", 1)[0], line_of(node), readonly))
    if not s.check_files:
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
