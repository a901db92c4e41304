"""What the real-Xen e2e's checks share (test_xen_e2e.py, test_xen_restart.py): where a run's
results are, and the guest's "E2E-R" (result) and "E2E-K" (kernel) lines from its console log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.e2e.stagecache import default_cache

R = TypeVar("R")

HERE = Path(__file__).resolve().parent


def results_dir(env_var: str, subdir: str, *run_args: str) -> Path | None:
    """$`env_var` (a finished run's directory); with VMMIOD_E2E=1, a run made now (`run
    *run_args`) into $VMMIOD_E2E_CACHE/`subdir`; else None (the tests skip)."""
    if os.environ.get(env_var):
        return Path(os.environ[env_var])
    if os.environ.get("VMMIOD_E2E") == "1":
        results = default_cache("VMMIOD_E2E_CACHE", "e2e") / subdir
        subprocess.run([sys.executable, str(HERE / "run"), *run_args, "--results", str(results)],
                       check=False)
        return results
    return None


def open_run(make: Callable[[Path], R], mode: str, env_var: str, subdir: str,
             *run_args: str) -> R:
    """The `mode` run's results (`make(dir)`, which has `.params`), from results_dir(): the
    checks skip when there is no run or it was another mode's, and fail when the run never got
    as far as preparing its directory."""
    d = results_dir(env_var, subdir, *run_args)
    if d is None:
        pytest.skip(f"real-Xen {mode} e2e: set {env_var}=<dir of a run> or VMMIOD_E2E=1 "
                    "(boots Xen under QEMU; .ci/e2e does both)")
    if not (d / "params.json").exists():
        pytest.fail(f"no e2e run in {d} (tests/e2e/xen/run did not get as far as preparing it)")
    r = make(d)
    params: Any = getattr(r, "params")  # noqa: B009  (each mode's Run class has its own)
    if params.get("E2E_MODE") != mode:
        pytest.skip(f"the run in {d} was a {params.get('E2E_MODE')} run, not a {mode} one")
    return r


def guest_lines(console: Path) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
    """([(what, {key: value})] of the "E2E-R what key=value..." lines, [the "E2E-K" lines])."""
    results: list[tuple[str, dict[str, str]]] = []
    kernel: list[str] = []
    if console.exists():
        for line in console.read_text(errors="replace").splitlines():
            m = re.search(r"E2E-R (\S+)(.*)", line)
            if m:
                results.append((m.group(1), dict(re.findall(r"(\S+?)=(\S*)", m.group(2)))))
            k = re.search(r"E2E-K (.*)", line)
            if k:
                kernel.append(k.group(1))
    return results, kernel
