"""What the vhost-user adaptor needs of a device, and what it gives one (the Transport).

The adaptor never imports vmmiod.devices: the daemon hands it device objects that fit
`VhostDevice` (vmmiod.devices.base.VirtioDevice does). vhost-user enters below the register
window (docs/architecture.md): the front-end owns status, feature and queue registers, so the
adaptor calls the device at "activate", "queue_notify" and, in a kick fd's callback,
"queue_kicked" (the queue is drained there), and answers it through `VhostTransport`: a
used-buffer notification writes the ring's call eventfd, a fault writes the error eventfds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vmmiod.hypervisors.vhost_user.vring import EVENTFD_ONE, Vring


class VhostDevice(Protocol):
    name: str
    device_id: int
    queue_max_sizes: tuple[int, ...]
    active: bool

    def device_features(self) -> int: ...

    def validate_features(self, features: int) -> bool: ...

    def config_bytes(self) -> bytes: ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def activate(self, memory: Any, queues: Any, features: int, transport: Any) -> None: ...

    def reset(self) -> None: ...

    def queue_notify(self, index: int) -> None: ...

    def queue_kicked(self, index: int) -> None: ...

    def on_queue_reset(self, index: int) -> None: ...


class VhostTransport:
    """The device's Transport while a front-end is connected."""

    def __init__(self, vrings: Sequence[Vring], counters: dict[str, int], log: Any,
                 on_fault: Callable[[str], None]) -> None:
        self.vrings = vrings
        self.counters = counters
        self.log = log
        self.on_fault = on_fault
        self._config_change_logged = False

    def signal_used(self, queue_index: int) -> None:
        fd = self.vrings[queue_index].call_fd
        if fd is not None:
            try:
                os.write(fd, EVENTFD_ONE)
                self.counters["calls"] += 1
                return
            except OSError:  # counter full (the front-end does not read it) or a closed fd
                pass
        self.counters["calls_dropped"] += 1

    def signal_config_change(self) -> None:
        # Telling the front-end needs the back-end request channel (BACKEND_REQ), which is
        # not offered: the guest sees the change when the front-end next reads the config.
        self.counters["config_changes_unsent"] += 1
        if not self._config_change_logged:
            self._config_change_logged = True
            self.log.info("vhost_user_config_change_unsent")

    def device_fault(self, reason: str) -> None:
        for vr in self.vrings:
            if vr.started:
                vr.signal("err_fd")
        self.on_fault(reason)
