"""The hostile guest's asynchronous moves (a mixin of fuzz_machine.HostileGuest).

Work stays in flight across moves: the block device's completions are parked for a seeded
random number of moves (`HeldCompletions` over the I/O engine's handler, the loop-side door
through which finished ops reach `BlockDevice._completed`) and delivered by `finish_io` in any
order; console
backends can stall (`StalledWrites`), keeping a transmit chain pending. Meanwhile the guest
disables and re-enables single queues (QueueReady=0 or QueueReset, legacy QueuePFN=0), resets
devices and disconnects guest memory: exactly the moves after which a late completion must not
touch what the driver took back (checks.py, invariant 5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from tests.hardening.checks import STATS, Checks
from tests.hardening.hostile import HeldCompletions, StalledWrites
from tests.hardening.stack import Stack
from vmmiod import mmio_regs as R
from vmmiod.sim.virtio_mmio import VirtioMmioDriver

dev_index = st.integers(0, 2)


class AsyncMoves:
    """Rules and plumbing for in-flight work; HostileGuest provides the attributes below."""

    stack: Stack | None
    checks: Checks | None
    drv: list[VirtioMmioDriver | None]
    rig: Stack
    held: HeldCompletions | None = None
    stalls: StalledWrites | None = None

    def act(self, name: str, fn: Callable[[], Any]) -> Any:
        raise NotImplementedError

    def block_request(self, rtype: int, sector: int, n: int, indirect: bool,
                      split_header: bool) -> None:
        raise NotImplementedError

    def console_traffic(self, q: int, n: int, msg: tuple[int, int, int],
                        indirect: bool) -> None:
        raise NotImplementedError

    def start_async(self, seed: int, hold: float) -> HeldCompletions:
        blk = self.rig.devices[0]
        self.held = HeldCompletions(blk.engine, "_handler", seed, hold=hold)
        self.stalls = StalledWrites(self.rig.devices[2].ports)
        return self.held

    def stop_async(self) -> None:
        if self.held is not None:
            STATS.parked += self.held.parked
            STATS.late_delivered += self.held.delivered
            STATS.stale_dropped += self.rig.devices[0].counters.get("stale_completions", 0)
            for w in self.rig.windows:
                STATS.stale_dropped += sum(q.stale_dropped for q in w.queues)
            self.held.drop()

    @rule(n=st.integers(1, 4), pick=st.integers(0, 7))
    def finish_io(self, n: int, pick: int) -> None:
        """Parked completions come back (any order: an engine may complete out of order)."""
        held = self.held
        assert held is not None
        self.act("finish_io", lambda: held.release(n, pick))

    @rule(i=dev_index, q=st.integers(0, 9),
          how=st.sampled_from(["ready0", "ready0", "ready0", "queue_reset", "disconnect"]),
          reenable=st.booleans(), size=st.sampled_from([16, 8, 4]))
    def take_back(self, i: int, q: int, how: str, reenable: bool, size: int) -> None:
        """The driver takes a queue back while the device may hold its chains: QueueReady=0
        (legacy: QueuePFN=0) or QueueReset, and maybe sets it up again at once at new
        addresses, reusing the same heads. Or the VMM disconnects: guest memory is detached
        (every device resets) and attached again."""
        if how == "disconnect":
            self.drv = [None, None, None]

            def gone() -> None:
                self.rig.bus.detach_memory()
                self.rig.bus.attach_memory(self.rig.memory)
            self.act("disconnect", gone)
            return
        d = self.drv[i]
        if d is not None and d.queues:
            q %= len(d.queues)  # one of the driver's queues (else any QueueSel value)
        base = self.rig.base(i)
        legacy = self.rig.windows[i].legacy

        def go() -> None:
            bus = self.rig.bus
            bus.access(base + R.QUEUE_SEL, 4, True, q)
            if legacy:
                bus.access(base + R.QUEUE_PFN, 4, True, 0)
            elif how == "queue_reset":  # needs RING_RESET; ignored (and logged) without it
                bus.access(base + R.QUEUE_RESET, 4, True, 1)
            else:
                bus.access(base + R.QUEUE_READY, 4, True, 0)
            if d is None or q >= len(d.queues):
                return
            d.queues[q] = None  # type: ignore[call-overload]
            if reenable:
                try:
                    d.setup_queue(q, size)
                except Exception:  # noqa: BLE001 - the device refused: its right
                    return
        self.act("take_back", go)

    @rule(stalled=st.booleans())
    def console_stall(self, stalled: bool) -> None:
        """The console's clients stop taking output (or take it again)."""
        stalls = self.stalls
        assert stalls is not None
        self.act("console_stall", lambda: stalls.set(stalled))

    @precondition(lambda self: self.drv[0] is not None or self.drv[2] is not None)
    @rule(console=st.booleans(), rtype=st.sampled_from([4, 4, 11, 13]),
          how=st.sampled_from(["ready0", "ready0", "queue_reset", "disconnect"]),
          reenable=st.booleans(), resubmit=st.booleans(), pick=st.integers(0, 3),
          port=st.integers(0, 1))
    def race(self, console: bool, rtype: int, how: str, reenable: bool, resubmit: bool,
             pick: int, port: int) -> None:
        """The interleaving that matters, as one move made of the others: work goes in flight
        (a block FLUSH/discard/write-zeroes whose completion is parked, or a console transmit
        chain held by a stalled backend), the driver takes the queue (or the VMM the memory)
        back, maybe sets the queue up again and submits again on the same head, and only then
        does the old work finish. Each part is a checked move of its own."""
        held, stalls = self.held, self.stalls
        assert held is not None and stalls is not None
        i = 2 if console and self.drv[2] is not None or self.drv[0] is None else 0
        if i == 0:
            held.hold_next(1)
            self.block_request(rtype=rtype, sector=0, n=16, indirect=False, split_header=False)
            q = 0
        else:
            q = 1 if port == 0 else 5  # port 0's transmitq, or port 1's (MULTIPORT)
            self.console_stall(True)
            self.console_traffic(q=q, n=9, msg=(0, 0, 0), indirect=False)
        self.take_back(i, q, how, reenable, 16)
        if resubmit and self.drv[i] is not None:
            if i == 0:
                self.block_request(rtype=rtype, sector=0, n=16, indirect=False,
                                   split_header=False)
            else:
                self.console_traffic(q=q, n=9, msg=(0, 0, 0), indirect=False)
        if i == 0:
            self.finish_io(4, pick)
        else:
            self.console_stall(False)

