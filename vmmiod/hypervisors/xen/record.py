"""The IOREQ server a running instance owns, recorded in its runtime directory.

Xen keeps an IOREQ server until it is destroyed or its domain dies. An instance killed with
SIGKILL cannot destroy its own, and the next instance (systemd's Restart=on-failure) would
create a second server for the same windows while the first, whose owner is gone, still claims
them. So each instance records `{domid, server}` once its server exists, and the next one
destroys a recorded server of the same domain before creating its own. The record lives in
systemd's RuntimeDirectory (kept across restarts by RuntimeDirectoryPreserve=restart), or in
/run/vmmiod/<guest>/ outside systemd.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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


def remove_record(path: Path, owner: tuple[int, int] | None = None) -> None:
    """Remove the record; with `owner`, only if it is still that (domid, server)'s (the next
    instance, for a rebuilt domain, may already have written its own)."""
    if owner is not None and read_record(path) != owner:
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
