"""The docs are a contract: README.md and docs/*.md say what vmmiod does, and people write their
own checks from them alone. This keeps the cheapest of their claims true mechanically:

- every configuration key the schema accepts is in docs/configuration.md and every key listed
  there is accepted, in the same section, with the choices, defaults, ranges and length limits
  the tables give;
- every `vmmiod` subcommand and flag the docs show exists (and every `python -m` module);
- every name docs/logging.md lists for the logs is one the code uses;
- every repository path they cite exists (files, globs, tests named with `::`);
- every example in config/ passes `vmmiod check --no-files`.

The schema side is read from the schema itself, not from a copy: each section is loaded from a
small probe file with `Reader.mapping` and `Reader.choice` recorded, so a key added to the code
and not to the doc (or the reverse) fails here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmmiod import cli
from vmmiod import configmodel as c
from vmmiod.config import ConfigError, load
from vmmiod.configreader import Reader

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))

# -- the schema, as the code reads it -------------------------------------------------------------
WINDOW = {"base": 0x10000000, "irq": 40}
CONSOLE = {"type": "console", "id": "c", "mmio": WINDOW, "backend": "pty"}
Doc = dict[str, Any]


PROBE_GUEST = "g"


def _doc(hyp: Any = "generic", dev: Doc | None = None, **top: Any) -> Doc:
    return {"guest": {"name": PROBE_GUEST}, "hypervisor": hyp, "devices": [dev or CONSOLE], **top}


def _net(backend: Any) -> Doc:
    return {"type": "net", "id": "n", "mmio": WINDOW, "backend": backend}


def _port_backend(backend: Doc) -> Doc:
    return {**CONSOLE, "backend": None, "ports": [{"name": "p", "backend": backend}]}


def _without_backend(dev: Doc) -> Doc:
    return {k: v for k, v in dev.items() if v is not None}


# Section (as named below) -> (its probe, given the extra keys to write into the section; the
# section's key path; the dataclass its defaults come from).
Probe = Callable[[Doc], Doc]
SECTIONS: dict[str, tuple[Probe, str, type | None]] = {
    "top": (lambda x: {**_doc(), **x}, "", None),
    "guest": (lambda x: {**_doc({"kind": "xen"}), "guest": {"name": PROBE_GUEST, **x}}, "guest",
              c.GuestConfig),
    "xen": (lambda x: _doc({"kind": "xen", **x}), "hypervisor", c.XenConfig),
    "generic": (lambda x: _doc({"kind": "generic", **x}), "hypervisor", c.GenericConfig),
    "vhost-user": (lambda x: _doc({"kind": "vhost-user", **x}, {
        "type": "console", "id": "c", "vhost_user": "/run/x.sock", "backend": "pty"}),
        "hypervisor", c.VhostUserConfig),
    "log": (lambda x: _doc(log=dict(x)), "log", c.LogConfig),
    "block": (lambda x: _doc(dev={"type": "block", "id": "b", "mmio": WINDOW, "path": "/x", **x}),
              "devices[0]", c.BlockConfig),
    "net": (lambda x: _doc(dev={**_net("tap"), **x}), "devices[0]", c.NetConfig),
    "console": (lambda x: _doc(dev={**CONSOLE, **x}), "devices[0]", c.ConsoleConfig),
    "mmio": (lambda x: _doc(dev={**CONSOLE, "mmio": {**WINDOW, **x}}), "devices[0].mmio",
             c.MmioConfig),
    "vhost_user": (lambda x: _doc({"kind": "vhost-user"}, {
        "type": "console", "id": "c", "backend": "pty",
        "vhost_user": {"socket": "/run/x.sock", **x}}), "devices[0].vhost_user",
        c.VhostUserSocket),
    "tap": (lambda x: _doc(dev=_net({"kind": "tap", **x})), "devices[0].backend",
            c.TapBackend),
    "dgram": (lambda x: _doc(dev=_net({"kind": "dgram", **x})), "devices[0].backend",
              c.DgramBackend),
    "port": (lambda x: _doc(dev=_without_backend({
        **CONSOLE, "backend": None, "ports": [{"name": "p", "backend": "pty", **x}]})),
        "devices[0].ports[0]", c.ConsolePortConfig),
    "pty": (lambda x: _doc(dev=_without_backend(_port_backend({"kind": "pty", **x}))),
            "devices[0].ports[0].backend", c.PtyBackend),
    "socket": (lambda x: _doc(dev=_without_backend(_port_backend(
        {"kind": "socket", "path": "/run/c.sock", **x}))), "devices[0].ports[0].backend",
        c.SocketBackend),
    "file": (lambda x: _doc(dev=_without_backend(_port_backend(
        {"kind": "file", "path": "/var/log/c.log", **x}))), "devices[0].ports[0].backend",
        c.FileBackend),
}
TAG_KEYS = {"kind"}  # written in the doc's prose and headings, not in its tables
FIELD_NAMES = {("vhost_user", "socket"): "path"}  # key -> dataclass field, where they differ


class Recorder:
    """Loads probe documents with the reader's mapping and choice calls recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.allowed: dict[str, tuple[str, ...]] = {}
        self.choices: dict[str, tuple[str, ...]] = {}
        self.tmp = tmp_path
        mapping, choice = Reader.mapping, Reader.choice

        def rec_mapping(reader: Reader, node: Any, path: str, allowed: Sequence[str],
                        *args: Any, **kw: Any) -> Any:
            self.allowed[path] = tuple(allowed)
            return mapping(reader, node, path, allowed, *args, **kw)

        def rec_choice(reader: Reader, node: Any, path: str, choices: Sequence[str]) -> Any:
            self.choices[path] = tuple(choices)
            return choice(reader, node, path, choices)

        monkeypatch.setattr(Reader, "mapping", rec_mapping)
        monkeypatch.setattr(Reader, "choice", rec_choice)

    def problems(self, document: Doc) -> list[str]:
        """The problems `vmmiod check --no-files` reports for this document."""
        try:
            self.load(document)
        except ConfigError as exc:
            return list(exc.problems)
        return []

    def load(self, document: Doc) -> c.Config:
        path = self.tmp / "probe.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return load(path, check_files=False)

    def keys(self, section: str) -> set[str]:
        probe, where, _ = SECTIONS[section]
        self.allowed.pop(where, None)
        self.problems(probe({}))
        assert where in self.allowed, f"the probe of {section} did not reach {where!r}"
        return set(self.allowed[where])


@pytest.fixture
def schema(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Recorder:
    return Recorder(monkeypatch, tmp_path)


# -- docs/configuration.md, as a reader sees it ---------------------------------------------------
@dataclasses.dataclass
class Row:
    keys: list[str]
    cells: dict[str, str]  # column header -> cell


def tables(text: str) -> dict[str, list[list[Row]]]:
    """Heading (without #s) -> its tables, in order; a row's keys are the first column's
    backticked names."""
    out: dict[str, list[list[Row]]] = {}
    heading = ""
    table: list[Row] | None = None
    header: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            heading, table = line.lstrip("#").strip(), None
            continue
        if not line.startswith("|"):
            table = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if table is None:
            table, header = [], cells
            out.setdefault(heading, []).append(table)
        elif set(line) <= set("|-: "):
            continue
        else:
            table.append(Row(re.findall(r"`([^`]+)`", cells[0]), dict(zip(header, cells))))
    return out


DOC_TABLES = tables(CONFIG_DOC.read_text())
# Section -> (heading, table index) in docs/configuration.md.
DOC_PLACES = {
    "guest": ("`guest`", 0), "xen": ("`kind: xen`", 0), "generic": ("`kind: generic`", 0),
    "vhost-user": ("`kind: vhost-user`", 0), "log": ("`log`", 0), "devices": ("`devices`", 0),
    "vhost_user": ("`vhost_user`", 0), "mmio": ("`mmio`", 0), "block": ("`type: block`", 0),
    "net": ("`type: net`", 0), "tap": ("`type: net`", 1), "dgram": ("`type: net`", 2),
    "console": ("`type: console`", 0), "port": ("`type: console`", 1),
    "port backends": ("`type: console`", 2),
}
DEVICE_TYPES = ("block", "net", "console")
PORT_BACKENDS = ("pty", "socket", "file")


def doc_rows(section: str) -> list[Row]:
    heading, index = DOC_PLACES[section]
    found = DOC_TABLES.get(heading, [])
    assert len(found) > index, f"docs/configuration.md: no table {index} under {heading!r}"
    return found[index]


def doc_keys(section: str) -> set[str]:
    if section == "top":
        return {m for m in re.findall(r"^## `(\w+)`$", CONFIG_DOC.read_text(), re.MULTILINE)}
    if section in DEVICE_TYPES:
        return doc_keys("devices") | doc_keys_of(doc_rows(section))
    if section in PORT_BACKENDS:
        rows = [r for r in doc_rows("port backends") if r.keys[:1] == [section]]
        assert rows, f"docs/configuration.md: no port backend {section!r}"
        return set(re.findall(r"`(\w+)`", rows[0].cells.get("keys", "")))
    return doc_keys_of(doc_rows(section))


def doc_keys_of(rows: list[Row]) -> set[str]:
    return {key for row in rows for key in row.keys}


def doc_row(section: str, key: str) -> Row | None:
    if section in PORT_BACKENDS or section in DEVICE_TYPES and key in doc_keys("devices"):
        return None  # the common keys' table has no type or default columns to check
    for row in doc_rows(section):
        if key in row.keys:
            return row
    return None


# -- configuration keys ---------------------------------------------------------------------------
@pytest.mark.parametrize("section", list(SECTIONS))
def test_config_keys_are_the_documented_ones(schema: Recorder, section: str) -> None:
    accepted = schema.keys(section) - TAG_KEYS
    documented = doc_keys(section)
    assert not accepted - documented, f"{section}: accepted, not in docs/configuration.md: " \
        f"{sorted(accepted - documented)}"
    assert not documented - accepted, f"{section}: in docs/configuration.md, not accepted: " \
        f"{sorted(documented - accepted)}"


def test_the_kinds_are_the_documented_ones(schema: Recorder) -> None:
    text = CONFIG_DOC.read_text()
    for probe, _, _ in SECTIONS.values():
        schema.problems(probe({}))
    kinds = {path: set(v) for path, v in schema.choices.items()
             if path.endswith((".kind", ".type"))}
    headings = re.compile(r"^### `(kind|type): ([\w-]+)`$", re.MULTILINE)
    assert kinds["hypervisor.kind"] == {k for t, k in headings.findall(text) if t == "kind"}
    assert kinds["devices[0].type"] == {k for t, k in headings.findall(text) if t == "type"}
    backend_row = doc_row("net", "backend")
    assert backend_row is not None
    assert kinds["devices[0].backend.kind"] == set(
        re.findall(r"`(\w+)`", backend_row.cells["meaning"]))
    assert kinds["devices[0].ports[0].backend.kind"] == {
        r.keys[0] for r in doc_rows("port backends")}


@pytest.mark.parametrize("section", [s for s in SECTIONS if s != "top"])
def test_config_choices_and_defaults_are_the_documented_ones(schema: Recorder,
                                                               section: str) -> None:
    probe, where, model = SECTIONS[section]
    keys = schema.keys(section) - TAG_KEYS
    base = probe({})
    loaded = _loaded_section(schema.load(base), where)  # every optional key left out
    # Every key written (with a value no reader takes): each choice reader records its choices.
    schema.problems(probe({k: "?" for k in keys if k not in _section_of(base, where)}))
    wrong: list[str] = []
    for key in sorted(keys):
        row = doc_row(section, key)
        if row is None:
            continue
        choices = schema.choices.get(f"{where}.{key}" if where else key)
        listed = set(re.findall(r"`([\w-]+)`", row.cells.get("type", "")))
        if choices is not None and "kind" not in row.cells.get("type", "") and \
                set(choices) != listed:  # (a kind is checked with the kinds, above)
            wrong.append(f"{key}: choices {sorted(choices)}, documented {sorted(listed)}")
        field = FIELD_NAMES.get((section, key), key)
        if model is not None and "default" in row.cells and key not in _section_of(base, where) \
                and field in {f.name for f in dataclasses.fields(model)}:
            problem = _default_mismatch(getattr(loaded, field), row, key)
            if problem:
                wrong.append(problem)
    assert not wrong, f"docs/configuration.md, {section}:\n" + "\n".join(wrong)


def _section_of(document: Doc, where: str) -> Doc:
    node: Any = document
    for part in re.findall(r"\w+|\[\d+\]", where):
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    return node if isinstance(node, dict) else {}


def _loaded_section(config: c.Config, where: str) -> Any:
    node: Any = config
    for part in re.findall(r"\w+|\[\d+\]", where):
        node = node[int(part[1:-1])] if part.startswith("[") else getattr(node, part)
    return node


def _default_mismatch(default: Any, row: Row, key: str) -> str | None:
    """The value the schema gave a key left out, against the doc's default column."""
    cell = row.cells["default"]
    if len(row.keys) > 1:  # `cols`, `rows` | 80, 25
        cell = [p.strip() for p in cell.split(",")][row.keys.index(key)]
    text = cell.replace("`", "").replace("<guest>", PROBE_GUEST).strip()
    if not text or "<" in text:
        return None  # a required key; or derived from what the probe does not set ("`<guest>-<id>`")
    if default is None:
        # "none (stderr)", "derived", "auto", "`<guest>-<id>` (...)": anything but a value
        return None if not re.fullmatch(r"[\d.x]+|true|false", text) else \
            f"{key}: default None, documented {cell!r}"
    documented: Any
    if isinstance(default, bool):
        documented = {"true": True, "false": False}.get(text)
    elif isinstance(default, int | float):
        try:
            documented = int(text, 8) if re.fullmatch(r"0[0-7]+", text) else float(text)
        except ValueError:
            documented = None
    else:
        documented, default = text, str(default)
    return None if documented == default else f"{key}: default {default!r}, documented {cell!r}"


RANGE = re.compile(r"(?<![\w.])(-?\d[\d_]*(?:\.\d+)?)-(\d[\d_]*(?:\.\d+)?)(?![\w.])")


@pytest.mark.parametrize("section", [s for s in SECTIONS if s not in ("top", *PORT_BACKENDS)])
def test_config_limits_are_the_documented_ones(schema: Recorder, section: str) -> None:
    """Each "integer A-B", "seconds A-B", "at most N bytes" and "power of 2" in a type column
    is probed at and just past its edges."""
    probe, where, _ = SECTIONS[section]
    wrong: list[str] = []
    for row in doc_rows(section):
        kind = row.cells.get("type", "")
        for key in row.keys:
            at = f"{where}.{key}" if where else key
            tries: list[tuple[Any, bool]] = []  # (value, accepted)
            m = RANGE.search(kind)
            if m:
                lo, hi = (float(g.replace("_", "")) for g in m.groups())
                step = 1 if lo == int(lo) else 0.01
                as_num: Callable[[float], Any] = (
                    lambda v: int(v) if v == int(v) else round(v, 6))
                tries += [(as_num(lo), True), (as_num(lo - step), False),
                          (as_num(hi), True), (as_num(hi + 1), False)]
            m = re.search(r"at most (\d+) bytes", kind)
            if m:
                n = int(m.group(1))
                tries += [("a" * n, True), ("a" * (n + 1), False)]
            if "power of 2" in kind:
                tries += [(3, False)]
            for value, accepted in tries:
                problems = [p for p in schema.problems(probe({key: value}))
                            if f": {at}: " in p]
                if bool(problems) == accepted:
                    wrong.append(f"{key}: {value!r} {'refused' if problems else 'accepted'}"
                                 f" ({kind}){': ' + problems[0] if problems else ''}")
    assert not wrong, f"docs/configuration.md, {section}:\n" + "\n".join(wrong)


# -- examples -------------------------------------------------------------------------------------
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_check_no_files(example: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--no-files", str(example)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"{example}: OK\n")


def test_the_readme_lists_every_example() -> None:
    readme = (ROOT / "README.md").read_text()
    assert [p for p in EXAMPLES if f"config/{p.name}" not in readme] == []


# -- commands -------------------------------------------------------------------------------------
def code_texts() -> Iterator[tuple[str, str]]:
    """(file, text) of every inline code span and fenced code block of the docs."""
    for path in DOCS:
        text = path.read_text()
        blocks = re.findall(r"^ *```[^\n]*\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL)
        rest = re.sub(r"^ *```[^\n]*\n.*?^ *```", "", text, flags=re.MULTILINE | re.DOTALL)
        name = path.relative_to(ROOT).as_posix()
        for block in blocks:
            # a command continued with a backslash is one line
            for line in block.replace("\\\n", " ").splitlines():
                yield name, re.sub(r"(^|\s)#.*", "", line)  # not the comments
        for span in re.findall(r"`([^`\n]+)`", rest):
            yield name, span


def commands() -> dict[tuple[str, ...], set[str]]:
    """`vmmiod SUB ...` and `python -m MODULE ...` commands in the docs: (program, sub or
    module) -> the words after it, up to a comment, pipe or the next command."""
    found: dict[tuple[str, ...], set[str]] = {}
    start = re.compile(r"(?:^|[\s;&|(])(?:(?:\S*/)?vmmiod|python3? -m ([\w.]+))"
                       r"((?:\s+[^\s#|;&)]+)*)")
    for name, text in code_texts():
        for m in start.finditer(text):
            module, words = m.group(1), m.group(2).split()
            if module not in (None, "vmmiod"):
                found.setdefault(("python -m", module), set()).update(words)
                continue
            while words and words[0].startswith("--"):  # global options before the command
                found.setdefault(("vmmiod", ""), set()).add(words.pop(0))
                if words and not words[0].startswith("-") and words[0] not in cli.DELEGATES \
                        and not re.fullmatch(r"[a-z][a-z0-9]*", words[0]):
                    words.pop(0)
            if words and re.fullmatch(r"[a-z][a-z0-9]*", words[0]):
                found.setdefault(("vmmiod", words[0]), set()).update(words[1:])
    return found


def _help(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "vmmiod", *args, "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_every_documented_vmmiod_command_and_flag_exists() -> None:
    found = {k[1]: v for k, v in commands().items() if k[0] == "vmmiod"}
    top = _help()
    subparsers = [a for a in cli.build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction)]
    subcommands = set(subparsers[0].choices)
    assert {"run", "check", "demo", "bench"} <= subcommands
    assert set(found) - {""} <= subcommands, "subcommands the docs show that vmmiod lacks"
    from vmmiod.bench import AREAS
    wrong: list[str] = []
    for sub, words in sorted(found.items()):
        text = _help(sub) if sub else top
        for word in sorted(words):
            flag = word.split("=")[0].rstrip(".,:")
            if flag.startswith("--") and re.fullmatch(r"--[a-z][\w-]*", flag) and \
                    not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                wrong.append(f"vmmiod {sub} {flag}")
            if sub == "bench" and re.fullmatch(r"[a-z]+", word) and word not in AREAS:
                wrong.append(f"vmmiod bench {word}: not an area")
    assert not wrong, "the docs show what vmmiod does not take:\n" + "\n".join(wrong)


def test_every_documented_python_module_and_its_flags_exist() -> None:
    wrong: list[str] = []
    for (_, module), words in sorted(commands().items()):
        if module.split(".")[0] not in ("vmmiod", "benchmarks"):
            continue  # pytest, ...
        base = ROOT / module.replace(".", "/")
        files = [p for p in (base.with_suffix(".py"), base / "__main__.py") if p.exists()]
        if not files:
            wrong.append(f"python -m {module}: no such module")
            continue
        source = "".join(p.read_text() for p in files)
        runs = "__main__" in source or files[0].name == "__main__.py"
        if not runs:
            wrong.append(f"python -m {module}: the module does nothing when run")
        if module == "vmmiod":
            continue  # its subcommands are checked above
        for word in sorted(words):
            flag = word.split("=")[0].rstrip(".,:")
            if re.fullmatch(r"--[a-z][\w-]*", flag) and f'"{flag}"' not in source:
                wrong.append(f"python -m {module} {flag}")
    assert not wrong, "\n".join(wrong)


# -- repository paths -----------------------------------------------------------------------------
TOP_DIRS = ("vmmiod", "tests", "config", "docs", "systemd", "benchmarks", ".ci")
REPO_PATH = re.compile(
    rf"(?<![\w/.~$=-])((?:{'|'.join(re.escape(d) for d in TOP_DIRS)})/[\w./*{{}},@%-]*[\w*}}])"
    r"(::[\w\[\]-]+)?")


FOREIGN = {"docs/interop/vhost-user.rst"}  # QEMU's, cited as the protocol's text


def cited_paths() -> Iterator[tuple[str, str, str | None]]:
    """(doc, path, test name or None) for every repository path a doc names: markdown links
    and paths starting with one of the repository's top folders."""
    for doc in DOCS:
        text = doc.read_text()
        name = doc.relative_to(ROOT).as_posix()
        for link in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
            if "://" not in link and not link.startswith("mailto:"):
                yield name, (doc.parent / link).resolve().relative_to(ROOT).as_posix(), None
        for m in REPO_PATH.finditer(text):
            if m.group(1) not in FOREIGN:
                yield name, m.group(1), (m.group(2) or "")[2:] or None


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",")
            for p in _expand(path[:m.start()] + alt + path[m.end():])]


def test_every_cited_repository_path_exists() -> None:
    missing: list[str] = []
    seen = 0
    for doc, cited, test in cited_paths():
        seen += 1
        for path in _expand(cited.rstrip(".")):
            if path.endswith("/"):
                path = path.rstrip("/")
            hits = list(ROOT.glob(path)) if "*" in path else \
                [ROOT / path] if (ROOT / path).exists() else []
            if not hits:
                missing.append(f"{doc}: {path}")
            elif test and not any(re.search(rf"^\s*(?:async )?def {re.escape(test)}\(",
                                            h.read_text(), re.MULTILINE) for h in hits):
                missing.append(f"{doc}: {path}::{test}")
    assert seen > 100, "the scan finds the docs' paths"
    assert not missing, "cited, not in the repository:\n" + "\n".join(missing)


def test_the_path_scan_reads_links_globs_and_tests() -> None:
    text = ("see [x](../config/a.yaml), `tests/test_a.py::test_b`, vmmiod/sim/{block,net}.py, "
            "/etc/vmmiod/web1.yaml and ~/.cache/vmmiod/e2e")
    found = [(m.group(1), m.group(2)) for m in REPO_PATH.finditer(text)]
    assert found == [("tests/test_a.py", "::test_b"), ("vmmiod/sim/{block,net}.py", None)]
    assert _expand("vmmiod/sim/{block,net}.py") == ["vmmiod/sim/block.py", "vmmiod/sim/net.py"]


# -- log events ------------------------------------------------------------------------------------
def test_every_documented_log_name_is_in_the_code() -> None:
    """The reverse of test_daemon's check: each name docs/logging.md lists under "Event names"
    (events, their keys, their stable values) is a string or a keyword argument in vmmiod/, so
    a renamed or removed event cannot stay documented."""
    words: set[str] = set()
    for path in (ROOT / "vmmiod").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                words.add(node.value)
            elif isinstance(node, ast.keyword) and node.arg:
                words.add(node.arg)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                words.update(a.arg for a in node.args.kwonlyargs + node.args.args)
    text = (ROOT / "docs" / "logging.md").read_text()
    names = set(re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9<>]+)+|[a-z]+)`",
                           text[text.index("## Event names"):]))
    assert len(names) > 150, "the scan finds the documented names"
    missing = sorted(n for n in names if "<" not in n and n not in words)
    assert not missing, "docs/logging.md names what vmmiod/ never logs: " + ", ".join(missing)


def test_xen_log_events_list_is_complete() -> None:
    """docs/xen.md's "Log events" names every event the Xen adaptor logs (the restart ones
    too) and says `dom0_*` for the service, whose events all carry that prefix."""
    from tests.test_daemon import logged_events

    text = (ROOT / "docs" / "xen.md").read_text()
    section = text[text.index("\n## Log events"):]
    section = section[:section.index("\n## ", 5)]
    listed = set(re.findall(r"`([a-z0-9_]+)`", section))
    events, unreadable = logged_events(ROOT / "vmmiod" / "hypervisors" / "xen")
    assert unreadable == [] and "xen_ioreq_server_reattached" in events
    assert sorted(set(events) - listed) == [], "docs/xen.md, Log events: not listed"
    assert sorted(listed - set(events)) == [], "docs/xen.md, Log events: not logged there"
    assert "`dom0_*`" in section
    dom0 = re.findall(r"log\.[a-z]+\(\s*\"([a-z0-9_]+)\"", (ROOT / "vmmiod" / "dom0.py").read_text())
    assert dom0 and all(e.startswith("dom0_") for e in dom0), dom0
