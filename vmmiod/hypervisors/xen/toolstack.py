"""What the toolstack asks a virtio backend domain to serve: the guests with virtio backend
entries under /local/domain/<be>/backend/{virtio_disk,virtio}/<domid>/ (see xenstore.py).

Used by the dom0 service (vmmiod.dom0), which watches those two directories and gets every
guest found there served by an instance of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmmiod.hypervisors.xen.xenstore import BACKEND_KINDS, XenStore

MAX_GUESTS = 1024  # domids looked at per scan (xenstore directories are bounded the same way)


@dataclass(frozen=True)
class ToolstackGuest:
    domid: int
    name: str | None  # /local/domain/<domid>/name (None: not written, or already removed)
    entries: bool  # it has virtio backend entries in this backend domain


def watch_paths(backend_domid: int) -> list[str]:
    """What the dom0 service watches: both backend directories, and domain introductions (a
    guest's instance can start before libxl writes the entries, and be ready for them)."""
    return [f"/local/domain/{backend_domid}/backend/{kind}" for kind in BACKEND_KINDS] + \
        ["@introduceDomain"]


def scan(xs: XenStore, backend_domid: int, known: dict[int, ToolstackGuest] | None = None
         ) -> dict[int, ToolstackGuest]:
    """Every guest with virtio backend entries in this backend domain, and every other
    introduced domain, by domid. A domain xenstored has not introduced yet is skipped (libxl
    names it first); names already in `known` are not read again (a scan runs at every watch
    event, while libxl's 10 s for InitWait are running)."""
    known = known or {}
    with_entries: set[int] = set()
    for root in watch_paths(backend_domid)[:len(BACKEND_KINDS)]:
        with_entries.update(int(d) for d in xs.directory(root)[:MAX_GUESTS] if d.isdigit())
    domains = {int(d) for d in xs.directory("/local/domain")[:MAX_GUESTS] if d.isdigit()}
    out: dict[int, ToolstackGuest] = {}
    for domid in sorted(with_entries | domains):
        if domid in (0, backend_domid):
            continue
        old = known.get(domid)
        if old is None and domid not in with_entries and not xs.domain_introduced(domid):
            continue
        name = old.name if old is not None and old.name is not None else \
            xs.read(f"/local/domain/{domid}/name")
        out[domid] = ToolstackGuest(domid, name, domid in with_entries)
    return out
