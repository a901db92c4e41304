"""The guest's domain: waiting until xenstored has it introduced, and noticing it is gone.

libxl writes /local/domain/<domid>/name before it introduces the domain; a domain that is named
but not introduced yet must not be served, nor taken for gone (the release watch would fire at
once and `xs_is_domain_introduced` say no). A dying domain of the same name (a reboot in
progress) is not introduced any more either: the newest introduced domain of that name is ours.
Once resolved, "no longer introduced" is proof that the domain is gone.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from vmmiod.config import GuestConfig
from vmmiod.hypervisors.base import GuestGone, PlatformUnavailable
from vmmiod.hypervisors.xen.xenstore import XenStore, XenStoreError, find_domids_by_name

POLL_INTERVAL = 0.2  # seconds between looks for the domain / backend entries


async def resolve_domid(xs: XenStore, guest: GuestConfig, wait: float, log: Any) -> int:
    """The guest's domid (by number or by name), once xenstored has it introduced; waits up
    to `wait` seconds (hypervisor.domain_wait), then PlatformUnavailable."""
    deadline = time.monotonic() + max(wait, 0.0)
    announced = False
    while True:
        if guest.domid is not None:
            if xs.domain_introduced(guest.domid):
                log.info("xen_domain_resolved", name=guest.name, domid=guest.domid)
                return guest.domid
        else:
            found = [d for d in find_domids_by_name(xs, guest.name) if xs.domain_introduced(d)]
            if found:
                log.info("xen_domain_resolved", name=guest.name, domid=max(found))
                return max(found)
        if time.monotonic() >= deadline:
            what = (f"domain {guest.domid}" if guest.domid is not None
                    else f"a domain named {guest.name!r}")
            raise PlatformUnavailable(
                f"{what} did not appear within {wait:g} s (hypervisor.domain_wait): create the "
                "guest (xl create) before or while vmmiod starts")
        if not announced:
            log.info("xen_domain_waiting", name=guest.name, domid=guest.domid, timeout=wait)
            announced = True
        await asyncio.sleep(POLL_INTERVAL)


def check_still_there(xs: XenStore, domid: int, name: str, log: Any, *,
                      missing: list[str] | None = None, cause: str | None = None) -> None:
    """Before serving: a resolved domain that is no longer introduced died (libxl failed to
    build it, `xl destroy` during creation) and will never be served: raises GuestGone (the
    instance then ends with 0, as for a guest that finished). Called while waiting for the
    toolstack's entries (`missing`: the devices still without one; the release watch is not
    registered yet, and would only say "look again"), and when preparing failed (`cause`: a
    dm_op on a dead domain fails too, which is then no platform problem)."""
    try:
        if xs.domain_introduced(domid):
            return
    except XenStoreError:
        return
    log.info("xen_domain_gone", domid=domid, served=False, missing=missing or [], cause=cause)
    detail = (f" (the toolstack had declared no virtio device for {', '.join(missing)} yet)"
              if missing else f" ({cause})" if cause else "")
    raise GuestGone(f"domain {domid} ({name}) went away before it was served{detail}: "
                    "nothing to serve")
