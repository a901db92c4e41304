"""The house's import rules (docs/architecture.md, "Who may import whom"), read from the source.

Every module under vmmiod/ is parsed with `ast` (nothing is imported), every `import` found,
wherever it stands (module level, inside a function, under `if TYPE_CHECKING:`): a type-only or
a late import is still a dependency of the design. Then the rules:

- layers (LAYERS): entry points, wiring, the two sides and the window, shared, core; a module
  imports its own layer or lower ones;
- hypervisors/* never import devices/*, devices/* never import hypervisors/*;
- hypervisors/* never import the window (mmio*): they see windows through vmmiod.bus.Window and
  vmmiod.transport.VirtioWindow; devices/* import neither the window, the bus nor IOREQs;
- virtqueue/* and memory.py import neither devices nor hypervisors (nor the window or the bus);
- the neutral modules (transport.py) import no device, hypervisor, window or bus module;
- the daemon (vmmiod.daemon) is imported only by the CLI, the demo and the dom0 service;
- nothing the daemon runs imports sim/ (the simulated guest, the VMM side, the drivers);
- the guest-side model (sim/) takes no ring layout from the device side it checks: no constant,
  no `vring_need_event`, no ring-size helper from vmmiod.virtqueue (classes it drives are fine);
- no import cycle between modules;
- no module over MAX_LINES lines.

`KNOWN` lists the violations that existed when this test was written (issue 18). It may only
shrink: a violation not in it fails, and so does an entry that no longer happens (whoever fixed
it removes the entry in the same commit).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vmmiod"
MAX_LINES = 400

# Issue 18: the violations found when the rule was written. Only ever remove entries.
# (rule, subject): subject is "importer -> imported", a cycle "a <-> b <-> ...", or a module.
KNOWN: frozenset[tuple[str, str]] = frozenset()

# The layers of docs/architecture.md, top to bottom: a module imports its own layer or lower ones.
# A module under none of these prefixes is in "shared" (config, bus, ioreq, transport, fences...).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entry", ("vmmiod.__main__", "vmmiod.cli", "vmmiod.demo", "vmmiod.bench", "vmmiod.sim")),
    # state.keeper: the daemon's keeper of the device state record (it reads the windows).
    ("wiring", ("vmmiod.daemon", "vmmiod.dom0", "vmmiod.log", "vmmiod.systemd",
                "vmmiod.state.keeper")),
    ("sides", ("vmmiod.hypervisors", "vmmiod.devices")),  # and the window: see is_window()
    ("shared", ()),
    ("core", ("vmmiod.virtqueue", "vmmiod.memory", "vmmiod.barrier")),
)


def is_window(name: str) -> bool:
    """The register window: vmmiod/mmio.py and its vmmiod/mmio_*.py parts."""
    return name == "vmmiod.mmio" or name.startswith("vmmiod.mmio_")


# Modules that run in the daemon: everything but the guest side, the figures and the entry points
# that start them.
NOT_DAEMON_SIDE = ("vmmiod.sim", "vmmiod.bench", "vmmiod.demo", "vmmiod.cli", "vmmiod.__main__")
NEUTRAL = ("vmmiod.transport",)
# The entry points that start daemons: the CLI, the demo, and the dom0 service (which forks one
# daemon per guest).
MAY_IMPORT_DAEMON = ("vmmiod.cli", "vmmiod.demo", "vmmiod.dom0")


@dataclass(frozen=True)
class Import:
    importer: str
    module: str  # the vmmiod module imported (`from a.b import c` -> a.b.c when c is a module)
    name: str | None  # the name taken from it (`from a.b import NAME`), None for a whole module
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if within(alias.name, "vmmiod"):
                    yield Import(name, alias.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not within(base, "vmmiod"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    yield Import(name, sub, None, node.lineno)
                else:
                    yield Import(name, base, alias.name, node.lineno)


def all_imports() -> list[Import]:
    known = modules()
    return [imp for name, path in known.items() for imp in imports_of(name, path, known)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def layer_of(name: str) -> int:
    if name == "vmmiod":  # the package itself: __version__
        return len(LAYERS) - 1
    if is_window(name):
        return [layer for layer, _ in LAYERS].index("sides")
    for index, (_layer, prefixes) in enumerate(LAYERS):
        if within(name, *prefixes):
            return index
    return [layer for layer, _ in LAYERS].index("shared")


def takes_layout(imp: Import) -> bool:
    """True unless a class is imported: classes the simulation drives (SplitQueue, the errors)
    are fine, the ring layout (constants, structs, vring_need_event, ring sizes) must be the
    guest's own (a whole module gives access to all of it)."""
    return imp.name is None or not imp.name[:1].isupper() or imp.name.isupper()


def violations() -> dict[tuple[str, str], str]:
    """(rule, subject) -> where it happens (file:line), for every broken rule."""
    found: dict[tuple[str, str], str] = {}
    known = modules()
    imports = all_imports()

    def add(rule: str, imp: Import) -> None:
        where = f"{known[imp.importer].relative_to(ROOT)}:{imp.line}"
        found.setdefault((rule, f"{imp.importer} -> {imp.module}"), where)

    for imp in imports:
        a, b = imp.importer, imp.module
        if (within(a, "vmmiod.hypervisors") and within(b, "vmmiod.devices")) or (
                within(a, "vmmiod.devices") and within(b, "vmmiod.hypervisors")):
            add("hypervisors-devices", imp)
        if layer_of(a) > layer_of(b):
            add("layers", imp)
        if within(a, "vmmiod.hypervisors") and is_window(b):
            add("hypervisors-see-no-window", imp)
        if within(a, "vmmiod.devices") and (is_window(b) or within(b, "vmmiod.bus", "vmmiod.ioreq")):
            add("devices-see-no-registers", imp)
        if within(a, "vmmiod.virtqueue", "vmmiod.memory") and (
                is_window(b) or within(b, "vmmiod.devices", "vmmiod.hypervisors", "vmmiod.bus")):
            add("core-imports-upward", imp)
        if within(a, *NEUTRAL) and (is_window(b) or within(
                b, "vmmiod.devices", "vmmiod.hypervisors", "vmmiod.bus", "vmmiod.daemon",
                "vmmiod.sim")):
            add("neutral-stays-neutral", imp)
        if within(b, "vmmiod.daemon") and not within(a, *MAY_IMPORT_DAEMON):
            add("daemon-imported-by-cli-only", imp)
        if within(b, "vmmiod.sim") and not within(a, *NOT_DAEMON_SIDE):
            add("daemon-side-imports-sim", imp)
        if within(a, "vmmiod.sim") and within(b, "vmmiod.virtqueue") and takes_layout(imp):
            key = ("guest-model-own-constants", f"{a} -> {b}")
            where = found.get(key, f"{known[a].relative_to(ROOT)}:{imp.line}")
            found[key] = f"{where} {imp.name or '(the module)'}"

    edges: dict[str, set[str]] = {name: set() for name in known}
    for imp in imports:
        if imp.module in known and imp.module != imp.importer:
            edges[imp.importer].add(imp.module)
    for component in cycles(edges):
        found[("cycle", " <-> ".join(component))] = ", ".join(
            str(known[m].relative_to(ROOT)) for m in component)

    for name, path in known.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            found[("size", name)] = f"{path.relative_to(ROOT)}: {lines} lines"
    return found


def test_no_new_violation() -> None:
    new = {key: where for key, where in violations().items() if key not in KNOWN}
    assert not new, "import rule broken (docs/architecture.md, 'Who may import whom'):\n" + "\n".join(
        f"  [{rule}] {subject}  ({where})" for (rule, subject), where in sorted(new.items()))


def test_known_violations_still_exist() -> None:
    stale = sorted(KNOWN - violations().keys())
    assert not stale, ("these violations are fixed: remove them from KNOWN in "
                       "tests/test_architecture.py (the list only shrinks):\n" + "\n".join(
                           f"  {key!r}" for key in stale))


# -- the checker itself ---------------------------------------------------------------------------
def test_cycles_finds_components() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert cycles(edges) == [["a", "b", "c"]]


@pytest.mark.parametrize("source, expected", [
    ("from vmmiod.devices.base import InterruptLine", ("vmmiod.devices.base", "InterruptLine")),
    ("from vmmiod.virtqueue import split", ("vmmiod.virtqueue.split", None)),
    ("import vmmiod.memory", ("vmmiod.memory", None)),
    ("def f():\n    from ..memory import GuestMemory", ("vmmiod.memory", "GuestMemory")),
    ("if TYPE_CHECKING:\n    from .base import Adaptor", ("vmmiod.hypervisors.base", "Adaptor")),
])
def test_imports_are_resolved(tmp_path: Path, source: str,
                              expected: tuple[str, str | None]) -> None:
    path = tmp_path / "vmmiod" / "hypervisors" / "mod.py"
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    known = {name: PACKAGE / "x.py" for name in ("vmmiod.virtqueue.split", "vmmiod.memory")}
    found = list(imports_of("vmmiod.hypervisors.mod", path, known))
    assert [(imp.module, imp.name) for imp in found] == [expected]


@pytest.mark.parametrize("name, layer", [
    ("vmmiod.cli", "entry"), ("vmmiod.sim.vring", "entry"), ("vmmiod.daemon", "wiring"),
    ("vmmiod.dom0", "wiring"),
    ("vmmiod.hypervisors.xen.adaptor", "sides"), ("vmmiod.mmio", "sides"),
    ("vmmiod.devices.net", "sides"), ("vmmiod.transport", "shared"), ("vmmiod.config", "shared"),
    ("vmmiod.a_new_module", "shared"), ("vmmiod.memory", "core"), ("vmmiod", "core"),
    ("vmmiod.virtqueue.split", "core"), ("vmmiod.mmio_regs", "sides"),
    ("vmmiod.mmio_anything", "sides"), ("vmmiod.mmiox", "shared"),
])
def test_layers(name: str, layer: str) -> None:
    assert LAYERS[layer_of(name)][0] == layer
