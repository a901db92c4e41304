"""The daemon's side of the device state record: open it, resume from it, hand it over.

`StateKeeper.open(windows)` maps the record file (vmmiod/state/store.py) and gives every window
its `WindowState` (vmmiod/mmio_state.py). The adaptor calls `guest_attached(identity)` once
guest memory is on the bus and before it serves any request: if the record belongs to this
guest and this connection (Xen: the same domain and IOREQ server; generic: the same ioreq page
memfd), every window resumes from it; otherwise (no record, another guest, torn, stale, another
format) the reason is logged and the guest starts from reset, as a new guest would.
`guest_attached(None)` (the VMM went away) forgets the guest.

At stop: `handover()` (SIGTERM, systemctl restart) freezes the record as it is, so the next
instance resumes; `guest_gone()` (the domain died, the VMM left for good) clears it.
"""

from __future__ import annotations

import time
from typing import Any

from vmmiod.mmio_regs import STATUS
from vmmiod.mmio_state import WindowState
from vmmiod.state.store import STATE_NAME, RecordRefused, StateStore, state_dir


class StateKeeper:
    def __init__(self, guest: str, log: Any, run_dir: str | None = None) -> None:
        self.guest = guest
        self.log = log
        self.path = state_dir(guest, run_dir) / STATE_NAME
        self.store: StateStore | None = None
        self.windows: list[Any] = []  # VirtioMmio, in bus order
        self.resumed = False  # the last guest_attached() resumed the devices
        self.resume_ms = 0.0

    def open(self, windows: list[Any]) -> None:
        """Map the record for these windows; without one the daemon runs as before (logged)."""
        store = StateStore(self.path, self.guest, [w.device.queue_max_sizes for w in windows],
                           [w.device.record_bytes() for w in windows])
        try:
            store.open()
        except OSError as exc:
            self.log.warning("state_record_unavailable", path=str(self.path),
                             error=exc.strerror or str(exc))
            return
        if store.refused is not None:
            self.log.warning("state_record_refused", path=str(self.path),
                             reason=store.refused.reason, message=str(store.refused))
        self.store = store
        self.windows = list(windows)
        for w, rec in zip(windows, store.windows):
            w.state = WindowState(w, rec)
            if len(rec.extra):
                w.device.attach_record_area(rec.extra)

    def guest_attached(self, identity: str | None) -> None:
        store = self.store
        if store is None:
            return
        if identity is None:
            store.set_identity(None)
            return
        t0 = time.perf_counter()
        states: list[dict[str, Any] | None] = []
        try:
            store.check_identity(identity)
            states = [w.load() for w in store.windows]
        except RecordRefused as exc:
            if exc.reason != "empty":
                self.log.warning("state_record_refused", path=str(self.path), reason=exc.reason,
                                 message=str(exc))
            states = []
        store.set_identity(identity)
        self.resumed = False
        if not any(states):
            for w in self.windows:
                w.state.save()  # the fresh state, before the guest touches anything
            return
        chains = 0
        try:
            for w, data in zip(self.windows, states):
                if data is not None and w.memory is not None:
                    chains += w.state.resume(data, w.memory)
        except Exception as exc:  # noqa: BLE001 (an untrusted file: whatever breaks, reset)
            reason = exc.reason if isinstance(exc, RecordRefused) else getattr(
                exc, "rule", type(exc).__name__)
            self.log.warning("state_record_refused", path=str(self.path), reason=reason,
                             message=str(exc))
            for w in self.windows:  # as a new guest would find them
                w.write(STATUS, 4, 0)
            return
        self.resumed = True
        self.resume_ms = (time.perf_counter() - t0) * 1000
        self.log.info("state_resumed", identity=identity, windows=sum(1 for s in states if s),
                      chains=chains, ms=round(self.resume_ms, 3))

    def handover(self) -> None:
        """Stopping for a restart: the record stays as the guest last saw it."""
        if self.store is not None:
            self.store.freeze()

    def guest_gone(self) -> None:
        if self.store is not None:
            self.store.discard()
            self.store.freeze()

    def close(self) -> None:
        for w in self.windows:
            w.state = None
        if self.store is not None:
            self.store.close()
            self.store = None
