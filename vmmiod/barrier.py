"""Memory barriers for rings shared with another CPU (the guest, or a VMM process).

Until the daemon installs real fences (vmmiod/fences.py, once at start, for every adaptor)
these are no-ops. What gets installed depends on the host CPU:
- x86-64 (TSO): stores stay in order and loads stay in order, and CPython emits each store as
  it runs, so `wmb()` and `rmb()` stay no-ops; but a later load may pass an earlier store, so
  `mb()` becomes a real full fence (mfence). The data path calls `mb()` exactly where it
  stores and then loads a field the other side writes (publish_used, enable_notification).
- arm64: `dmb ish` / `dmb ishst` / `dmb ishld`.
The virtqueue and the ioreq slot server look these names up at call time
(`barrier.mb()`), so an installed fence takes effect everywhere.
"""

from __future__ import annotations

from collections.abc import Callable


def _noop() -> None:
    return None


wmb: Callable[[], None] = _noop  # earlier stores visible before later stores
rmb: Callable[[], None] = _noop  # earlier loads complete before later loads and stores
mb: Callable[[], None] = _noop  # full barrier: also earlier stores before later loads


def install(full: Callable[[], None], write: Callable[[], None] | None = None,
            read: Callable[[], None] | None = None) -> None:
    """Replace the barriers (vmmiod.fences.install; tests). `write`/`read` default to `full`."""
    global wmb, rmb, mb
    mb = full
    wmb = write or full
    rmb = read or full


def uninstall() -> None:
    """Back to no-ops (tests only: the litmus test's "without the fence" run)."""
    install(_noop, _noop, _noop)
