"""What the e2e stages' build scripts share (tests/e2e/xen/build.py, tests/e2e/vhost_user/
build.py, and their `run`): where a stage keeps its cache, and one build or run at a time per
cache. Imported as a top-level module (each script puts tests/e2e/ on sys.path), or as
tests.e2e.stagecache."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_WAIT = 1800  # seconds to wait for another build or run using the same cache


def default_cache(env_var: str, name: str) -> Path:
    """$`env_var` if set, else ~/.cache/vmmiod/<name> (outside the clone: downloads, builds)."""
    env = os.environ.get(env_var)
    return Path(env) if env else Path.home() / ".cache" / "vmmiod" / name


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """One build or run at a time per cache: two would overwrite each other's files. Waits up to
    LOCK_WAIT for another holder (saying so once), then gives up with SystemExit."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        deadline = time.monotonic() + LOCK_WAIT
        announced = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    print(f"e2e: waiting for another build or run using {cache}", flush=True)
                    announced = True
                if time.monotonic() > deadline:
                    raise SystemExit(f"e2e: {cache} stayed locked for {LOCK_WAIT}s") from None
                time.sleep(1)
        yield
