"""What must hold after every move of the hostile guest (fuzz_machine.py), and the figures.

`Checks.step(name, fn)` runs one move inside the event loop, lets the devices finish what the
move started (queue work, the block worker's flushes, frames from the peer), then asserts:

1. nothing escaped: no exception reached the event loop, no `window_error`,
   `device_reset_error` or `device_activate_error` (the bus and window catch device bugs and log
   those), nothing logged at exception/critical level;
2. guest memory: the guard bytes around every region are intact, and every byte that changed
   while the devices ran was handed out writable by the audited memory layer (or written by the
   guest itself); the audit itself raises inside the device if a buffer is not the asked range;
3. budgets: no chain walk read more descriptors than the ring size plus one (plus the entries of
   the one indirect table it may use, plus one), and no queue popped more than twice its size
   in one move;
4. violations: every `guest_protocol_violation` leaves its window in DEVICE_NEEDS_RESET, every
   window newly in DEVICE_NEEDS_RESET has one, every VirtqueueError a queue raised ends there,
   and every access the memory layer refused (`memory.rejected`) shows up as a violation or a
   failed request (the device's error counters); no violation is the device's own completion
   bookkeeping (`UsedIdNotInFlight`: completing a head that is not in flight is never the
   guest's doing);
5. taken back means taken back: when a queue is reset (QueueReady=0, QueueReset, Status 0,
   disconnect) the device-writable buffers of the chains it still held are "reclaimed"; no byte
   of them changes afterwards unless the guest wrote it, a newly popped chain covers it, or it
   lies in a live used ring (a late completion writing a status byte there is the bug this
   catches).

With delayed completions (`held`, tests/hardening/hostile.py HeldCompletions) a move settles when
the block I/O engine has nothing running (what it finished may be parked), not when every
request is answered: the next move runs while work is in flight.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.hardening.hostile import BusVmm, HeldCompletions, WalkMeter
from tests.hardening.stack import WINDOW_SIZE, Stack
from vmmiod.hypervisors.generic.protocol import Window
from vmmiod.mmio_regs import DEVICE_NEEDS_RESET, STATUS
from vmmiod.sim.virtio_mmio import VirtioMmioDriver
from vmmiod.virtqueue import VirtqueueError
from vmmiod.virtqueue.fastwalk import linear_reader

ESCAPES = {"window_error", "device_reset_error", "device_activate_error"}
DEVICE_INDEX = {"vda": 0, "net0": 1, "con0": 2}
# Counters that say "this request failed" (the other half of "violation or failed request").
FAILURE_COUNTERS = ("errors", "malformed", "io_errors", "requests_unsupported", "ctrl_errors",
                    "control_dropped", "dropped_bytes")
SETTLE_YIELDS = 3
BLK_HDR = struct.Struct("<IIQ")
RECLAIM_MAX_LEN = 65536  # longer (hostile) buffers are not tracked
RECLAIM_MAX = 512  # ranges tracked at once (the oldest go first)
DEVICE_BUGS = {"UsedIdNotInFlight"}  # violations only a device's own bookkeeping can cause


@dataclass
class Stats:
    runs: int = 0
    steps: int = 0
    violations: int = 0
    needs_reset: int = 0
    rejected: int = 0
    failed_requests: int = 0
    queue_errors: int = 0
    recoveries: int = 0
    reclaimed: int = 0  # buffers taken back by a queue reset while the device held them
    stale_dropped: int = 0  # completions of an older queue generation dropped
    parked: int = 0  # completions held back for later moves
    late_delivered: int = 0  # parked completions delivered by a later move
    audited: int = 0
    descriptors_read: int = 0
    max_walk: int = 0  # most descriptors one walk read
    max_pops: int = 0  # most chains one queue popped in one move
    rules: dict[str, int] = field(default_factory=dict)
    error_events: dict[str, int] = field(default_factory=dict)


STATS = Stats()
METER = WalkMeter()


class Checks:
    def __init__(self, stack: Stack, loop: asyncio.AbstractEventLoop,
                 held: HeldCompletions | None = None) -> None:
        self.stack = stack
        self.loop = loop
        self.held = held
        self.loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.queue_errors: list[tuple[int, VirtqueueError]] = []
        self.walk_problems: list[str] = []
        self.pops: dict[tuple[int, int], int] = {}
        # Chains each queue popped and has not completed; buffers taken back by a reset.
        self.outstanding: dict[tuple[int, int], list[Any]] = {}
        self.reclaimed: list[tuple[int, int, bytes]] = []  # gpa, length, bytes at last check
        for wi, w in enumerate(stack.windows):
            for q in w.queues:
                q.pop = self._metered(wi, q)  # type: ignore[method-assign]
                q.pop_tables = self._metered_tables(wi, q)  # type: ignore[method-assign]
                q.add_used = self._completed(wi, q)  # type: ignore[method-assign]
                q.add_used_run = self._completed_run(wi, q)  # type: ignore[method-assign]
                q.reset = self._resetting(wi, q)  # type: ignore[method-assign]

    # -- taken-back buffers (invariant 5) -------------------------------------------------------
    def _completed(self, wi: int, q: Any) -> Callable[..., Any]:
        orig = q.add_used

        def add_used(head: int, length: int, *rest: Any) -> Any:
            out = orig(head, length, *rest)
            if out is not False:  # False: a stale completion the queue dropped
                chains = self.outstanding.get((wi, q.index), [])
                for k, c in enumerate(chains):
                    if c.head == head:
                        del chains[k]
                        break
            return out
        return add_used

    def _completed_run(self, wi: int, q: Any) -> Callable[[list[int]], None]:
        orig = q.add_used_run

        def add_used_run(elems: list[int]) -> None:
            orig(elems)
            chains = self.outstanding.get((wi, q.index), [])
            for head in elems[0::2]:
                for k, c in enumerate(chains):
                    if c.head == head:
                        del chains[k]
                        break
        return add_used_run

    def _resetting(self, wi: int, q: Any) -> Callable[[], None]:
        orig = q.reset

        def reset() -> None:
            guest = self.stack.memory.guest
            for chain in self.outstanding.pop((wi, q.index), []):
                for gpa, n in chain.writable:
                    if 0 < n <= RECLAIM_MAX_LEN and self._in_ram(gpa, n):
                        self.reclaimed.append((gpa, n, guest.read(gpa, n)))
                        STATS.reclaimed += 1
            del self.reclaimed[:-RECLAIM_MAX]
            orig()
        return reset

    def _in_ram(self, gpa: int, n: int) -> bool:
        return any(b.region.writable and b.region.gpa <= gpa and gpa + n <= b.region.end
                   for b in self.stack.memory.backings)

    def _forget_overlapping(self, ranges: list[tuple[int, int]]) -> None:
        if not self.reclaimed or not ranges:
            return
        self.reclaimed = [r for r in self.reclaimed
                          if not any(r[0] < g + n and g < r[0] + r[1] for g, n in ranges)]

    def _refresh_reclaimed(self) -> None:
        """Before a move: what the guest wrote between moves is the guest's business."""
        guest = self.stack.memory.guest
        self.reclaimed = [(g, n, guest.read(g, n)) for g, n, _ in self.reclaimed]

    def _check_reclaimed(self, name: str) -> None:
        st = self.stack
        live = [(q.used_addr, 6 + 8 * q.size) for w in st.windows for q in w.queues if q.ready]
        self._forget_overlapping(live)
        guest = st.memory.guest
        bad = []
        for gpa, n, old in self.reclaimed:
            cur = guest.read(gpa, n)
            if cur != old:
                region = next(b.region for b in st.memory.backings
                              if b.region.gpa <= gpa < b.region.end)
                dirty = guest.dirty[region.gpa]
                off = gpa - region.gpa
                changed = [k for k in range(n) if cur[k] != old[k] and not dirty[off + k]]
                if changed:
                    bad.append(f"{gpa + changed[0]:#x} ({old[changed[0]]:#x} -> "
                               f"{cur[changed[0]]:#x})")
        assert not bad, (f"{name}: the device wrote into buffers the driver had taken back "
                         f"(a completion after a queue/device reset): {bad[:4]}")

    def _metered(self, wi: int, q: Any) -> Callable[[], Any]:
        orig = q.pop

        def pop() -> Any:
            METER.start()
            try:
                chain = orig()
            except VirtqueueError as exc:
                self.queue_errors.append((wi, exc))
                raise
            finally:
                reads = METER.reads
                STATS.descriptors_read += reads
                STATS.max_walk = max(STATS.max_walk, reads)
                # The walk reads the next descriptor before it checks the budget, so a loop is
                # found on read size + 1 (and table + 1 inside an indirect table).
                if reads > q.size + 1 + (METER.indirect_entries + 1 if METER.indirect_entries
                                         else 0):
                    self.walk_problems.append(
                        f"window {wi} queue {q.index}: a walk read {reads} descriptors "
                        f"(size {q.size}, indirect {METER.indirect_entries})")
            if chain is not None:
                key = (wi, q.index)
                self.pops[key] = self.pops.get(key, 0) + 1
                self.outstanding.setdefault(key, []).append(chain)
                self._forget_overlapping(chain.writable)  # the device owns these again
            return chain
        return pop

    def _metered_tables(self, wi: int, q: Any) -> Callable[[int], Any]:
        """The batch pop (virtqueue/batch.py): its chains are owned like pop()'s."""
        orig = q.pop_tables

        def pop_tables(limit: int) -> Any:
            popped = orig(limit)
            key = (wi, q.index)
            for head, v in popped:
                reader = linear_reader((v[2], v[6], v[10]))
                assert reader is not None
                chain = reader(v, q.memory, head)
                self.pops[key] = self.pops.get(key, 0) + 1
                self.outstanding.setdefault(key, []).append(chain)
                self._forget_overlapping(chain.writable)  # the device owns these again
            return popped
        return pop_tables

    # -- one move -------------------------------------------------------------------------------
    async def settle(self) -> None:
        """Quiet, not finished: the block worker idle, or all it still owes is parked."""
        for _ in range(SETTLE_YIELDS):
            await asyncio.sleep(0)
        blk = self.stack.devices[0]
        deadline = self.loop.time() + 5.0
        engine = blk.engine  # ops still running in the kernel or on helper threads
        while engine is not None and engine.in_flight and self.loop.time() < deadline:
            await asyncio.sleep(0.0005)
        for _ in range(SETTLE_YIELDS):
            await asyncio.sleep(0)

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        st = self.stack
        mem = st.memory
        mark = len(st.events.events)
        rejected, audited = mem.rejected, mem.audited
        counters = [dict(d.counters) for d in st.devices]
        needs = [bool(w.status & DEVICE_NEEDS_RESET) for w in st.windows]
        self.queue_errors.clear()
        self.pops.clear()
        mem.guest.clean()
        snap = mem.snapshot()
        self._refresh_reclaimed()

        async def run() -> Any:
            out = fn()
            await self.settle()
            return out

        result = self.loop.run_until_complete(run())
        STATS.steps += 1
        STATS.audited += mem.audited - audited
        STATS.rules[name] = STATS.rules.get(name, 0) + 1
        self._check(name, mark, rejected, counters, needs, snap)
        return result

    def _check(self, name: str, mark: int, rejected: int, counters: list[dict[str, int]],
               needs: list[bool], snap: list[bytes]) -> None:
        st = self.stack
        new = st.events.since(mark)
        assert not self.loop_errors, f"{name}: escaped to the event loop: {self.loop_errors}"
        escaped = [e for e in new if e.get("event") in ESCAPES
                   or e.get("level") in ("exception", "critical")]
        assert not escaped, f"{name}: {escaped}"
        for e in new:
            if e.get("level") == "error":
                key = str(e.get("event"))
                STATS.error_events[key] = STATS.error_events.get(key, 0) + 1
        assert st.memory.guards_intact(), f"{name}: a guard byte around guest memory changed"
        outside = st.memory.changed_outside(snap)
        assert not outside, f"{name}: devices wrote where nothing was handed out: {outside}"
        assert not self.walk_problems, f"{name}: {self.walk_problems}"
        for (wi, qi), n in self.pops.items():
            size = st.windows[wi].queues[qi].size
            STATS.max_pops = max(STATS.max_pops, n)
            assert n <= 2 * size + 2, f"{name}: window {wi} queue {qi} popped {n} chains"
        violations = [e for e in new if e.get("event") == "guest_protocol_violation"]
        STATS.violations += len(violations)
        own = [e for e in violations if e.get("error") in DEVICE_BUGS]
        assert not own, f"{name}: the device blamed the guest for its own bookkeeping: {own}"
        self._check_reclaimed(name)
        now = [bool(w.status & DEVICE_NEEDS_RESET) for w in st.windows]
        flagged = {DEVICE_INDEX[str(e.get("device"))] for e in violations}
        for wi in flagged:
            assert now[wi], f"{name}: violation logged but window {wi} not in NEEDS_RESET: " \
                            f"{[e for e in violations if DEVICE_INDEX[e['device']] == wi]}"
        for wi in range(len(now)):
            if now[wi] and not needs[wi]:
                STATS.needs_reset += 1
                assert wi in flagged, f"{name}: window {wi} in NEEDS_RESET without an event"
        STATS.queue_errors += len(self.queue_errors)
        for wi, exc in self.queue_errors:
            assert now[wi], f"{name}: {type(exc).__name__} ({exc}) did not reset window {wi}"
        failed = sum(d.counters.get(k, 0) - c.get(k, 0)
                     for d, c in zip(st.devices, counters)
                     for k in list(FAILURE_COUNTERS) + [k for k in d.counters
                                                         if "dropped" in k])
        STATS.failed_requests += max(failed, 0)
        refused = st.memory.rejected - rejected
        if refused:
            STATS.rejected += refused
            assert violations or failed > 0 or any(now), \
                f"{name}: memory refused {refused} access(es) and nobody was told"

    # -- liveness after any history -------------------------------------------------------------
    def recover(self, i: int, vmm: BusVmm) -> VirtioMmioDriver:
        st = self.stack
        base, irq = st.base(i), st.lines[i].irq
        d = VirtioMmioDriver(vmm, Window(base, WINDOW_SIZE, irq))  # type: ignore[arg-type]
        mem = vmm.memory
        alloc = vmm.alloc
        done: dict[str, Any] = {}

        def bring_up() -> None:
            st.bus.access(base + STATUS, 4, True, 0)
            assert d.probe() == st.devices[i].device_id
            d.negotiate(0)
            qs = d.setup_queues([8] if i == 0 else [8, 8])
            d.driver_ok()
            if i == 0:
                hdr, data, status = alloc.alloc(16), alloc.alloc(512), alloc.alloc(1)
                mem.write(hdr, BLK_HDR.pack(0, 0, 0))
                mem.write(status, b"\xff")
                qs[0].add([(hdr, 16)], [(data, 512), (status, 1)], "blk")
                done["status"] = status
                d.notify(0)
            elif i == 1:
                hdr_len = 12 if d.version == 2 else 10  # legacy without MRG_RXBUF: 10
                frame = bytes(hdr_len) + b"\x02" * 6 + b"\x04" * 6 + b"\x88\xb5" + b"rec" * 20
                buf = alloc.alloc(len(frame))
                mem.write(buf, frame)
                qs[1].add([(buf, len(frame))], [], "net")
                done["frame"] = frame[hdr_len:]
                d.notify(1)
            else:
                buf = alloc.alloc(16)
                mem.write(buf, b"recovered\n")
                qs[1].add([(buf, 10)], [], "con")
                d.notify(1)
            done["queues"] = qs

        self.step("recover", bring_up)
        q = done["queues"][1 if i else 0]
        got = None
        for _ in range(400):
            got = q.get_used()
            if got is not None:
                break
            self.loop.run_until_complete(asyncio.sleep(0.001))
        name = ("block", "net", "console")[i]
        assert got is not None, f"{name}: a well-formed request after reset never completed"
        if i == 0:
            assert mem.read(done["status"], 1) == b"\x00", f"block: status {mem.read(done['status'], 1)!r}"
        elif i == 1:
            seen = []
            for _ in range(100):
                try:
                    seen.append(st.peer.recv(70000))
                except BlockingIOError:
                    if done["frame"] in seen:
                        break
                    self.loop.run_until_complete(asyncio.sleep(0.001))
                except OSError:
                    break
            assert done["frame"] in seen, "net: the frame sent after reset never reached the peer"
        return d
