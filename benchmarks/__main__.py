"""`python -m benchmarks`: see benchmarks/run.py."""

from __future__ import annotations

import sys

from vmmiod.bench import main

raise SystemExit(main(sys.argv[1:]))
