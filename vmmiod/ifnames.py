"""Linux interface names as vmmiod gives them: the rule for a valid name and the default a TAP
backend takes when the config gives no `ifname` (`<guest>-<id>`, shortened with a hash).

Shared by the config schema (which checks that no two devices end up with the same interface)
and the TAP backend (vmmiod/devices/net_tap.py), which creates or attaches that interface.
"""

from __future__ import annotations

import hashlib
import re

IFNAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")


def default_ifname(guest: str, device_id: str) -> str:
    """A stable interface name for (guest, device) within Linux's 15 characters."""

    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.\-]", "", s)

    name = f"{clean(guest)}-{clean(device_id)}"
    if IFNAME_RE.match(name) and name not in (".", ".."):
        return name
    tag = hashlib.sha256(f"{guest}\0{device_id}".encode()).hexdigest()[:4]
    return f"{clean(guest)[:5]}-{clean(device_id)[:4]}-{tag}"
