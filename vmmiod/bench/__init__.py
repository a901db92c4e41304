"""Benchmarks: one entry point (`vmmiod bench`, `python -m benchmarks`), one module per area.

Each area module defines `run(quick: bool) -> dict[str, object]` returning its figures (flat
names to numbers or small dicts); `vmmiod.bench.main` runs the selected areas in one process,
prints a table and, with --json, the figures as JSON. Figures only: nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

AREAS = ("virtqueue", "registers", "channel", "block", "net", "console", "vhost")


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix} / {k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def run_areas(areas: Sequence[str], quick: bool, progress: Any = None) -> dict[str, Any]:
    """{area: figures} for each area whose module exists; {"error": ...} when one fails."""
    results: dict[str, Any] = {}
    for area in areas:
        try:
            module = importlib.import_module(f"vmmiod.bench.{area}")
        except ModuleNotFoundError as exc:
            if exc.name == f"vmmiod.bench.{area}":
                continue  # that area's benchmark is not written (yet)
            raise
        if progress is not None:
            progress(area)
        t0 = time.perf_counter()
        try:
            figures = module.run(quick)
        except Exception as exc:  # noqa: BLE001 -- one broken area must not hide the others' figures
            figures = {"error": f"{type(exc).__name__}: {exc}"}
        results[area] = {"figures": figures, "seconds": round(time.perf_counter() - t0, 2)}
    return results


def print_table(results: dict[str, Any]) -> None:
    for area, r in results.items():
        rows: list[tuple[str, Any]] = []
        _flatten("", r["figures"], rows)
        width = max((len(k) for k, _ in rows), default=10)
        print(f"\n== {area} ({r['seconds']} s)")
        for key, value in rows:
            print(f"  {key:<{width}}  {_fmt(value):>14}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmmiod bench", description=(
        "Benchmark figures, in one run: " + ", ".join(AREAS) + ". Prints a table (or JSON). "
        "Figures only; nothing is asserted."))
    p.add_argument("areas", nargs="*", metavar="AREA",
                   help=f"areas to run (default: all of {', '.join(AREAS)})")
    p.add_argument("--quick", action="store_true", help="short runs (figures are rougher)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    unknown = [a for a in args.areas if a not in AREAS]
    if unknown:
        p.error(f"unknown area(s) {', '.join(unknown)}; choose from {', '.join(AREAS)}")
    areas = args.areas or list(AREAS)
    say = None if args.json else (lambda a: print(f"running {a} ...", file=sys.stderr,
                                                  flush=True))
    results = run_areas(areas, args.quick, say)
    missing = [a for a in areas if a not in results]  # no module for them in this tree
    if args.json:
        print(json.dumps({"quick": args.quick, "areas": results, "not_available": missing},
                         indent=2))
    else:
        print_table(results)
        if missing:
            print(f"\n(no benchmark module yet for: {', '.join(missing)})")
    return 1 if any("error" in r["figures"] for r in results.values()) else 0
