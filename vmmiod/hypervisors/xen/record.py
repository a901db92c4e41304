"""The IOREQ server a running instance owns, recorded in its runtime directory.

Xen keeps an IOREQ server until it is destroyed or its domain dies. An instance that is killed
(SIGKILL) or stops for a restart (SIGTERM) leaves its server; the guest's vCPUs that touch a
window meanwhile wait in their ioreq slots. So each instance records `{domid, server}` once its
server exists, and the next one takes the recorded server of the same domain over
(`take_over()`: docs/restart.md): same ioreq page, the vCPUs' ports bound again, every slot
left READY or INPROCESS answered. A server that cannot be taken over (Xen refuses: it is gone,
or the domain was rebuilt) is destroyed, as is done for any server nobody will serve, and the
log says why; a record of another domain is dropped. The record lives in systemd's
RuntimeDirectory (kept across restarts and stops by RuntimeDirectoryPreserve=yes), or in
/run/vmmiod/<guest>/ outside systemd.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmmiod.hypervisors.xen.handles import DeviceModel
    from vmmiod.hypervisors.xen.server import IoreqServer

RECORD_NAME = "ioreq-server.json"


def record_path(guest: str, run_dir: str | None = None) -> Path:
    base = run_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or \
        f"/run/vmmiod/{guest}"
    return Path(base) / RECORD_NAME


def read_record(path: Path) -> tuple[int, int] | None:
    """(domid, server id) of the previous instance, or None when there is no usable record."""
    try:
        data: Any = json.loads(path.read_text())
        domid, sid = int(data["domid"]), int(data["server"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return domid, sid


def write_record(path: Path, domid: int, sid: int) -> None:
    """Atomically record the server this instance owns (raises OSError)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"domid": domid, "server": sid}))
    os.replace(tmp, path)


def take_over(path: Path, domid: int, server: IoreqServer, ranges: list[tuple[int, int]],
              dm: DeviceModel, log: Any) -> bool:
    """Attach `server` to the recorded one if it is this domain's; True when it is attached.

    Otherwise the recorded server of this domain is destroyed (it would still claim the
    windows) and False is returned: the caller creates a new one.
    """
    prev = read_record(path)
    if prev is None:
        return False
    prev_domid, sid = prev
    if prev_domid != domid:
        log.info("xen_server_record_ignored", server=sid, record_domid=prev_domid,
                 reason="the record is of another domain (the guest was rebuilt)")
        remove_record(path)
        return False
    try:
        server.attach(sid, ranges)
        return True
    except OSError as exc:
        log.warning("xen_server_reattach_failed", server=sid, error=str(exc),
                    reason="Xen refused the recorded server; destroying it")
        server.leave()  # this attempt's ports and mapping, not the server itself
    remove_record(path)
    try:
        dm.destroy_ioreq_server(sid)
    except OSError as exc:  # already gone (the domain was rebuilt, or Xen cleaned up)
        log.info("xen_stale_server_absent", server=sid, error=str(exc))
        return False
    log.warning("xen_stale_server_destroyed", server=sid, domid=domid)
    return False


def remove_record(path: Path, owner: tuple[int, int] | None = None) -> None:
    """Remove the record; with `owner`, only if it is still that (domid, server)'s (the next
    instance, for a rebuilt domain, may already have written its own)."""
    if owner is not None and read_record(path) != owner:
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
