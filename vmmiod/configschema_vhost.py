"""The vhost-user parts of the configuration schema (docs/configuration.md, docs/vhost-user.md):
the `hypervisor: {kind: vhost-user}` section and each device's `vhost_user` endpoint."""

from __future__ import annotations

from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode

from vmmiod import configmodel as c
from vmmiod.configreader import TAG_STR, child

# `schema` below is the configschema.Schema calling (its reader `r`, `fields()`, `claim()`,
# `kind`); not imported, so the two modules are no cycle.
Schema = Any

KIND = "vhost-user"
HYPERVISOR_KEYS = ("socket_mode", "reconnect")
ENDPOINT_KEYS = ("socket", "connect", "config")


def hypervisor(schema: Schema, m: dict[str, Node]) -> c.VhostUserConfig:
    r = schema.r
    kw: dict[str, Any] = schema.fields(m, "hypervisor", {
        "socket_mode": r.file_mode,
        "reconnect": lambda n, q: r.number(n, q, 0.05, 3600),
    })
    return c.VhostUserConfig(**kw)


def endpoint(schema: Schema, node: Node, path: str) -> c.VhostUserSocket | None:
    """`vhost_user: PATH` (the daemon listens) or `{socket: PATH, connect: BOOL, config: BOOL}`
    (`config` left out: None, decided by the device type, VhostUserSocket.offers_config)."""
    r = schema.r
    if isinstance(node, ScalarNode) and node.tag == TAG_STR:
        sock = r.socket_path(node, path)
        if sock is None:
            return None
        schema.claim("path", str(sock), node, path)
        return c.VhostUserSocket(sock)
    if not isinstance(node, MappingNode):
        r.problem(node, path, "expected a socket path or {socket: PATH, connect: true|false}")
        return None
    m = r.mapping(node, path, ENDPOINT_KEYS, required=("socket",))
    if m is None:
        return None
    kw: dict[str, Any] = schema.fields(m, path, {"socket": r.socket_path, "connect": r.boolean,
                                                 "config": r.boolean})
    if "socket" not in kw:
        return None
    schema.claim("path", str(kw["socket"]), m["socket"], child(path, "socket"))
    return c.VhostUserSocket(kw["socket"], bool(kw.get("connect", False)), kw.get("config"))


def device_transport(schema: Schema, m: dict[str, Node], node: Node,
                     path: str) -> tuple[bool, c.VhostUserSocket | None]:
    """For a device section: (ok, endpoint). With kind vhost-user the device needs
    `vhost_user` and must not have `mmio`; with any other kind the reverse."""
    r = schema.r
    if schema.kind != KIND:
        if "vhost_user" in m:
            r.problem(m["vhost_user"], child(path, "vhost_user"),
                      f"only for hypervisor kind {KIND} (this guest's devices have an mmio "
                      "window)")
        if "mmio" not in m:
            r.problem(node, child(path, "mmio"), "missing required key")
        return "vhost_user" not in m and "mmio" in m, None
    ok = True
    if "mmio" in m:
        r.problem(m["mmio"], child(path, "mmio"), f"not used with hypervisor kind {KIND} (the "
                                                  "VMM owns the transport); give vhost_user: "
                                                  "{socket: PATH}")
        ok = False
    if "vhost_user" not in m:
        r.problem(node, child(path, "vhost_user"), "missing required key (hypervisor kind "
                                                   f"{KIND}: the device's socket)")
        return False, None
    ep = endpoint(schema, m["vhost_user"], child(path, "vhost_user"))
    return ok and ep is not None, ep
