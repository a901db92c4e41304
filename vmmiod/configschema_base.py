"""What every part of the configuration schema shares: the reader, the resources claimed so far
(paths, interfaces, addresses, images) and the helpers that read variant mappings and optional
fields (vmmiod/configschema.py is the schema; configschema_devices.py the device sections)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode

from vmmiod.configreader import TAG_STR, Reader, child, line_of

Read = Callable[[Node, str], Any]


def peek(node: Node, key: str) -> Node | None:
    """The value of `key` in a mapping node, before the mapping itself is checked."""
    if isinstance(node, MappingNode):
        for k, v in node.value:
            if isinstance(k, ScalarNode) and k.value == key and isinstance(v, Node):
                return v
    return None


class SchemaBase:
    """The state of one load and the helpers; problems are recorded on the reader."""

    def __init__(self, reader: Reader, check_files: bool) -> None:
        self.r = reader
        self.check_files = check_files
        self.claims: dict[tuple[str, str], tuple[str, int]] = {}
        self.bridges: list[tuple[str, Node, str]] = []  # TAP bridges, checked at the end
        self.images: dict[str, tuple[str, int, bool]] = {}
        self.guest_name: str | None = None  # once guest.name is read (defaults derive from it)

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
