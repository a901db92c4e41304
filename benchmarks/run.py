"""Run every benchmark area and print a table (--json for JSON, --quick for short runs)."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmmiod.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
