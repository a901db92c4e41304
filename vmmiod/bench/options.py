"""The command line of one benchmark area run as a module (`python -m vmmiod.bench.AREA`).

Only `--quick` and `--help`: an unknown option is refused (exit 2) instead of being ignored
while the benchmark runs anyway. `vmmiod bench` (vmmiod/bench/__init__.py) runs several areas.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def quick_option(area: str, what: str, argv: Sequence[str] | None = None) -> bool:
    """Parse `argv` (default: sys.argv[1:]) for `python -m vmmiod.bench.<area>`; True for
    --quick. --help prints `what` and exits 0."""
    ap = argparse.ArgumentParser(prog=f"python -m vmmiod.bench.{area}",
                                 description=f"{what} Figures only; nothing is asserted.")
    ap.add_argument("--quick", action="store_true", help="short runs (figures are rougher)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    return bool(args.quick)
