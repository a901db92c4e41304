"""Memory barriers for rings shared with another CPU (the guest, or a VMM process).

On x86-64 the hardware keeps stores in order and loads in order (TSO), so a compiler barrier
is enough, and CPython emits each store as it runs: these functions are no-ops there. On arm64
the order of plain stores is not guaranteed to another observer; the Xen adaptor installs real
fences here (see vmmiod/hypervisors/xen/ and docs/architecture.md) through `install()`.
"""

from __future__ import annotations

from collections.abc import Callable


def _noop() -> None:
    return None


wmb: Callable[[], None] = _noop  # earlier stores visible before later stores
rmb: Callable[[], None] = _noop  # earlier loads complete before later loads
mb: Callable[[], None] = _noop  # full barrier


def install(full: Callable[[], None], write: Callable[[], None] | None = None,
            read: Callable[[], None] | None = None) -> None:
    """Replace the barriers (used by adaptors on weakly ordered machines)."""
    global wmb, rmb, mb
    mb = full
    wmb = write or full
    rmb = read or full
