"""What the toolstack asks a virtio backend domain to serve: the guests with virtio backend
entries under /local/domain/<be>/backend/{virtio_disk,virtio}/<domid>/ (see xenstore.py).

Used by the dom0 service (vmmiod.dom0), which watches those two directories and gets every
guest found there served by an instance of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmmiod.hypervisors.xen.abi import XENBUS_STATE_INITIALISING
from vmmiod.hypervisors.xen.xenstore import BACKEND_KINDS, XenStore, parse_number

MAX_GUESTS = 1024  # domids looked at per scan (xenstore directories are bounded the same way)


@dataclass(frozen=True)
class ToolstackGuest:
    domid: int
    name: str | None  # /local/domain/<domid>/name (None: not written, or already removed)
    entries: int  # virtio backend entries for it
    waiting: int  # of which in state Initialising (1): the toolstack waits for InitWait


def watch_paths(backend_domid: int) -> list[str]:
    return [f"/local/domain/{backend_domid}/backend/{kind}" for kind in BACKEND_KINDS]


def scan(xs: XenStore, backend_domid: int) -> dict[int, ToolstackGuest]:
    """Every guest that has virtio backend entries in this backend domain, by domid."""
    counts: dict[int, list[int]] = {}
    for root in watch_paths(backend_domid):
        for d in xs.directory(root)[:MAX_GUESTS]:
            if not d.isdigit():
                continue
            domid = int(d)
            c = counts.setdefault(domid, [0, 0])
            for devid in xs.directory(f"{root}/{d}"):
                c[0] += 1
                state = parse_number(xs.read(f"{root}/{d}/{devid}/state"))
                c[1] += state == XENBUS_STATE_INITIALISING
    return {domid: ToolstackGuest(domid, xs.read(f"/local/domain/{domid}/name"), n, waiting)
            for domid, (n, waiting) in counts.items()}
