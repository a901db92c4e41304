"""Benchmarks: one entry point (`vmmiod bench`, `python -m benchmarks`), one module per area.

Each area module defines `run(quick: bool) -> dict[str, object]` returning its figures (flat
names to numbers or small dicts); `vmmiod.bench.main` runs the selected areas in one process,
prints a table and, with --json, the figures as JSON. Figures only: nothing here asserts speed.
"""

from __future__ import annotations

AREAS = ("virtqueue", "registers", "channel", "block", "net", "console")
