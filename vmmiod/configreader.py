"""Typed reading of a composed YAML document, with every problem recorded and none raised.

`vmmiod.config` describes the schema; this module knows YAML nodes: it reads mappings, lists
and scalars, checks their types and ranges, and records each problem with its line and key
path (`devices[1].mmio.base`), so one run reports everything that is wrong. Working on nodes
(yaml.compose) rather than on constructed Python objects is what gives us line numbers.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from vmmiod.configmodel import SocketAddress

TAG_STR = "tag:yaml.org,2002:str"
TAG_INT = "tag:yaml.org,2002:int"
TAG_FLOAT = "tag:yaml.org,2002:float"
TAG_BOOL = "tag:yaml.org,2002:bool"
TAG_NULL = "tag:yaml.org,2002:null"
TAG_MERGE = "tag:yaml.org,2002:merge"

QUEUE_SIZE_MAX = 32768  # split virtqueue limit (VIRTIO 1.2, 2.7)
BLK_ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES: the GET_ID serial
IFNAMSIZ = 16  # including the NUL
SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes, the last one a NUL
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_NAME = re.compile(r"^[^\x00-\x20\x7f/]{1,64}$")  # printable, no blanks, no '/'
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")

# What a wrong-typed value is called in messages.
_KIND = {TAG_STR: "a string", TAG_INT: "an integer", TAG_FLOAT: "a number",
         TAG_BOOL: "a boolean", TAG_NULL: "nothing (null)"}


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


def child(path: str, key: str | int) -> str:
    """The key path of a mapping key or list item below `path`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = _KIND.get(node.tag, f"a value tagged {node.tag}")
    if node.tag == TAG_NULL:
        return kind
    return f"{kind} {node.value!r}"


class Reader:
    """Reads values from nodes; a bad value records a problem and reads as None."""

    def __init__(self, label: str, base_dir: Path, loader: yaml.SafeLoader) -> None:
        self.label = label  # the file name as the user gave it
        self.base_dir = base_dir  # relative paths in the file are relative to its folder
        self._loader = loader
        self.problems: list[tuple[int, str, str]] = []  # (line, key path, message)
        self._merged: dict[int, int] = {}  # id(mapping node) -> pairs that came from merges

    def problem(self, where: Node | int, path: str, message: str) -> None:
        line = where if isinstance(where, int) else line_of(where)
        self.problems.append((line, path or "(document)", message))

    def messages(self) -> list[str]:
        ordered = sorted(enumerate(self.problems), key=lambda p: (p[1][0], p[0]))
        return [f"{self.label}:{line}: {path}: {msg}" for _, (line, path, msg) in ordered]

    # -- containers -----------------------------------------------------------------------------
    def mapping(self, node: Node, path: str, allowed: Sequence[str],
                required: Sequence[str] = (), *,
                elsewhere: Mapping[str, str] | None = None) -> dict[str, Node] | None:
        """The keys of a mapping node, after checking for unknown, duplicate and missing keys.

        `elsewhere` names where a key not allowed here would be valid ("kind generic"), for a
        message more useful than "unknown key".
        """
        if not isinstance(node, MappingNode):
            self.problem(node, path, f"expected a mapping, got {describe(node)}")
            return None
        merged = self._flatten(node)
        out: dict[str, Node] = {}
        first_line: dict[str, int] = {}
        for i, (key_node, value) in enumerate(node.value):
            if not isinstance(key_node, ScalarNode) or key_node.tag == TAG_NULL:
                self.problem(key_node, path, f"a key must be a name, got {describe(key_node)}")
                continue
            key = str(key_node.value)
            if key in out and i >= merged:
                if first_line[key] >= 0:
                    self.problem(key_node, child(path, key),
                                 f"duplicate key (first at line {first_line[key]})")
                    continue
                # A key written here overrides the one a merge key (<<) brought in.
            elif key in out:
                continue  # among merged keys the first one wins
            if key not in allowed and elsewhere and key in elsewhere:
                self.problem(key_node, child(path, key), f"only valid with {elsewhere[key]}")
                continue
            if key not in allowed:
                hint = suggest(key, allowed) or f" (expected one of: {', '.join(allowed)})"
                self.problem(key_node, child(path, key), f"unknown key{hint}")
                continue
            out[key] = value
            first_line[key] = line_of(key_node) if i >= merged else -1
        for key in required:
            if key not in out:
                self.problem(node, child(path, key), "missing required key")
        return out

    def _flatten(self, node: MappingNode) -> int:
        """Resolve merge keys (`<<: *defaults`), which the composer leaves to the constructor.

        Returns how many of the mapping's pairs came from merges: PyYAML puts them first.
        """
        if id(node) in self._merged:  # an alias of a mapping already read
            return self._merged[id(node)]
        merged = 0
        if any(k.tag == TAG_MERGE for k, _ in node.value):
            own = sum(1 for k, _ in node.value if k.tag != TAG_MERGE)
            try:
                self._loader.flatten_mapping(node)
            except yaml.MarkedYAMLError as exc:
                self.problem(node, "", f"bad merge key: {exc.problem}")
            merged = len(node.value) - own
        self._merged[id(node)] = merged
        return merged

    def sequence(self, node: Node, path: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.problem(node, path, f"expected a list, got {describe(node)}")
            return None
        return list(node.value)

    # -- scalars --------------------------------------------------------------------------------
    def string(self, node: Node, path: str, *, max_len: int | None = None) -> str | None:
        """A string. Plain numbers and booleans are read as the text written (`serial: 0042`)."""
        if not isinstance(node, ScalarNode) or node.tag == TAG_NULL:
            self.problem(node, path, f"expected a string, got {describe(node)}")
            return None
        text = str(node.value)
        if not text:
            self.problem(node, path, "must not be empty")
            return None
        if max_len is not None and len(text.encode()) > max_len:
            self.problem(node, path, f"{text!r} is longer than {max_len} bytes")
            return None
        return text

    def choice(self, node: Node, path: str, choices: Sequence[str]) -> str | None:
        if not isinstance(node, ScalarNode) or node.tag not in (TAG_STR, TAG_BOOL, TAG_INT):
            self.problem(node, path, f"expected one of {', '.join(choices)}, got {describe(node)}")
            return None
        text = str(node.value)
        if text not in choices:
            self.problem(node, path, f"{text!r} is not one of {', '.join(choices)}"
                         + suggest(text, choices))
            return None
        return text

    def integer(self, node: Node, path: str, lo: int | None = None,
                hi: int | None = None) -> int | None:
        """An integer, written as a YAML number or as a decimal/0x-hex string ("0x2000000")."""
        value: int | None = None
        if isinstance(node, ScalarNode) and node.tag == TAG_INT:
            value = self._construct_int(node)
        elif isinstance(node, ScalarNode) and node.tag == TAG_STR:
            value = parse_int(str(node.value))
        if value is None:
            self.problem(node, path,
                         f"expected an integer (decimal or 0x hex), got {describe(node)}")
            return None
        return self._in_range(node, path, value, lo, hi, hexa=node.value.lower().startswith("0x"))

    def number(self, node: Node, path: str, lo: float | None = None,
               hi: float | None = None) -> float | None:
        value: float | None = None
        if isinstance(node, ScalarNode) and node.tag in (TAG_INT, TAG_FLOAT, TAG_STR):
            try:
                value = float(str(node.value).replace("_", ""))
            except ValueError:
                value = None
            if value is not None and not math.isfinite(value):
                value = None
        if value is None:
            self.problem(node, path, f"expected a number, got {describe(node)}")
            return None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.problem(node, path, f"{node.value} is outside {lo:g}..{hi:g}")
            return None
        return value

    def boolean(self, node: Node, path: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == TAG_BOOL:
            return bool(self._loader.construct_yaml_bool(node))
        self.problem(node, path, f"expected true or false, got {describe(node)}")
        return None

    def path(self, node: Node, path: str) -> Path | None:
        text = self.string(node, path)
        if text is None:
            return None
        if "\0" in text:
            self.problem(node, path, "a path must not contain NUL")
            return None
        p = Path(text).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def socket_path(self, node: Node, path: str) -> Path | None:
        """A path a Unix socket is bound to or connected at: it must fit sockaddr_un."""
        p = self.path(node, path)
        if p is not None and not self._fits_sun_path(node, path, p):
            return None
        return p

    def _fits_sun_path(self, node: Node, path: str, p: Path) -> bool:
        n = len(os.fsencode(p))
        if n > SUN_PATH_MAX:
            self.problem(node, path, f"{p} is {n} bytes long; a Unix socket's path holds at "
                                     f"most {SUN_PATH_MAX}")
        return n <= SUN_PATH_MAX

    def is_word(self, node: Node, word: str) -> bool:
        """True for a plain string scalar equal to `word` (e.g. `auto`)."""
        return isinstance(node, ScalarNode) and node.tag == TAG_STR and node.value == word

    # -- helpers --------------------------------------------------------------------------------
    def _construct_int(self, node: ScalarNode) -> int | None:
        try:
            return int(self._loader.construct_yaml_int(node))
        except (ValueError, yaml.YAMLError):
            return None

    def _in_range(self, node: Node, path: str, value: int, lo: int | None, hi: int | None,
                  hexa: bool) -> int | None:
        fmt = (lambda v: hex(v)) if hexa else str
        if lo is not None and value < lo:
            self.problem(node, path, f"{fmt(value)} is below the minimum {fmt(lo)}")
            return None
        if hi is not None and value > hi:
            self.problem(node, path, f"{fmt(value)} is above the maximum {fmt(hi)}")
            return None
        return value

    # -- vmmiod's own value types ---------------------------------------------------------------
    def bool_or_auto(self, node: Node, path: str) -> bool | str | None:
        if self.is_word(node, "auto"):
            return "auto"
        if isinstance(node, ScalarNode) and node.tag == TAG_BOOL:
            return bool(self._loader.construct_yaml_bool(node))
        self.problem(node, path, f"expected true, false or auto, got {describe(node)}")
        return None

    def file_mode(self, node: Node, path: str) -> int | None:
        """A file mode, octal however it is written (as chmod reads it): 0600, 600, "0600" and
        "0o600" are all 0o600. The text as written is read, so YAML's reading of a bare 600 as
        the decimal number 600 does not turn it into another mode."""
        value: int | None = None
        if isinstance(node, ScalarNode) and node.tag in (TAG_INT, TAG_STR):
            value = parse_int(str(node.value), octal=True)
        if value is None:
            self.problem(node, path, f"expected a file mode in octal (like 0600), got "
                                     f"{describe(node)}")
            return None
        if not 0 <= value <= 0o777:
            self.problem(node, path, f"{node.value} is not a file mode: expected 0 to 0777 in "
                                     "octal, like 0600 or \"0660\"")
            return None
        return value

    def queue_size(self, node: Node, path: str) -> int | None:
        size = self.integer(node, path, 1, QUEUE_SIZE_MAX)
        if size is not None and size & (size - 1):
            self.problem(node, path, f"{size} is not a power of 2")
            return None
        return size

    def ident(self, node: Node, path: str) -> str | None:
        text = self.string(node, path)
        if text is not None and not _ID.match(text):
            self.problem(node, path, f"{text!r} is not a valid id (letters, digits, _ and -, "
                                       "at most 32, starting with a letter or digit)")
            return None
        return text

    def name(self, node: Node, path: str) -> str | None:
        text = self.string(node, path)
        if text is not None and not _NAME.match(text):
            self.problem(node, path, f"{text!r} is not a valid name (1 to 64 printable "
                                       "characters, no spaces or '/')")
            return None
        return text

    def serial(self, node: Node, path: str) -> str | None:
        text = self.string(node, path, max_len=BLK_ID_BYTES)
        if text is not None and not text.isascii():
            self.problem(node, path, "the serial must be ASCII")
            return None
        return text

    def ifname(self, node: Node, path: str) -> str | None:
        text = self.string(node, path, max_len=IFNAMSIZ - 1)
        if text is not None and (text in (".", "..") or re.search(r"[/:\s]", text)):
            self.problem(node, path, f"{text!r} is not a valid interface name")
            return None
        return text

    def mac(self, node: Node, path: str) -> str | None:
        # Unquoted, 52:54:00:12:34:56 is a YAML 1.1 base-60 integer: string() reads the text.
        text = self.string(node, path)
        if text is None:
            return None
        if not _MAC.match(text):
            self.problem(node, path, f"{text!r} is not a MAC address (like 52:54:00:12:34:56)")
            return None
        first = int(text[:2], 16)
        if first & 1 or text.replace(":", "").strip("0") == "":
            self.problem(node, path, f"{text} is a multicast or zero address; a NIC needs a "
                                       "unicast one")
            return None
        return text.lower()

    def address(self, node: Node, path: str) -> SocketAddress | None:
        r = self
        text = r.string(node, path)
        if text is None:
            return None
        family, _, rest = text.partition(":")
        if family == "unix" and rest:
            where = r.base_dir / Path(rest).expanduser()
            return SocketAddress("unix", path=where) if r._fits_sun_path(node, path, where) \
                else None
        if family == "udp":
            host, _, port_text = rest.rpartition(":")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            port = int(port_text) if port_text.isdigit() else -1
            try:
                ipaddress.ip_address(host)
            except ValueError:
                port = -1
            if 0 <= port <= 65535:
                return SocketAddress("udp", host=host, port=port)
        r.problem(node, path, f"{text!r} is not an address: write udp:IP:PORT or unix:PATH")
        return None


def parse_int(text: str, *, octal: bool = False) -> int | None:
    """Decimal or 0x/0o/0b text; with `octal`, bare digits are octal (file modes like "0600")."""
    text = text.strip()
    if octal and text.isdigit():
        try:
            return int(text, 8)
        except ValueError:
            return None
    try:
        return int(text, 0)
    except ValueError:
        return None
