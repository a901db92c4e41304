"""The hostile guest as a hypothesis state machine over the full stack (tests/hardening/stack.py).

Each rule is one thing a malicious (or buggy) driver does: a register access at any offset and
size, a raw IOREQ of any kind, a Linux-like bring-up with any feature set, a well-formed
request, a descriptor or ring entry pointing anywhere (guards, the hole, the read-only region,
past 2**64), avail.idx jumps, notifications of any queue, resets mid-I/O, INVALIDATE, frames from
the network peer, console clients that come and go. After every rule `Checks` (checks.py)
proves the invariants; the `recover` rule proves a reset device always works again. Work
stays in flight across moves (fuzz_async.py): block completions are parked and delivered by
later moves, console backends stall, and queues, devices and memory are taken away meanwhile.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from tests.hardening.checks import STATS, Checks
from tests.hardening.fuzz_async import AsyncMoves
from tests.hardening.hostile import BusVmm
from tests.hardening.stack import (
    RAM2_GPA,
    RAM2_SIZE,
    RAM_GPA,
    RAM_SIZE,
    ROM_GPA,
    ROM_SIZE,
    WINDOW_BASE,
    WINDOW_SIZE,
    Stack,
    slice_of,
)
from vmmiod import mmio_regs as R
from vmmiod.hypervisors.generic.protocol import Window
from vmmiod.ioreq import IoRequest
from vmmiod.sim.virtio_mmio import VirtioMmioDriver
from vmmiod.sim.vring import Allocator, DriverQueue
from vmmiod.virtqueue.split import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

try:
    import uvloop
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
except ImportError:  # pragma: no cover - the daemon falls back the same way
    new_loop = asyncio.new_event_loop

BLK_HDR = struct.Struct("<IIQ")
CTRL = struct.Struct("<IHH")
HOLE = RAM2_GPA + RAM2_SIZE + 0x1000
ADDRESSES = [0, 1, RAM_GPA, RAM_GPA + 1, RAM_GPA + 7, RAM_GPA + RAM_SIZE - 16,
             RAM2_GPA - 8, RAM2_GPA + RAM2_SIZE - 4, RAM2_GPA + RAM2_SIZE, HOLE, ROM_GPA,
             ROM_GPA + ROM_SIZE - 8, RAM_GPA - 1, RAM_GPA - 4096, 0xFFFF_FFF0,
             (1 << 64) - 16, (1 << 64) - 1, (1 << 63)]
U32S = [0, 1, 2, 3, 15, 16, 17, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
        0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF]
REGISTERS = sorted(R.REGISTER_NAMES) + [R.CONFIG + i for i in (0, 1, 2, 4, 6, 8, 10, 12, 20,
                                                               0x20, 0xFC)]
addresses = st.one_of(st.sampled_from(ADDRESSES), st.integers(0, (1 << 64) - 1),
                      st.integers(RAM_GPA - 64, ROM_GPA + ROM_SIZE + 64))
lengths = st.one_of(st.sampled_from([0, 1, 2, 11, 12, 16, 512, 513, 4096, 65536, 0xFFFF_FFFF]),
                    st.integers(0, 0xFFFF_FFFF))
u32 = st.one_of(st.sampled_from(U32S), st.integers(0, 0xFFFF_FFFF))
dev_index = st.integers(0, 2)


class HostileGuest(AsyncMoves, RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        STATS.runs += 1
        self.loop = new_loop()
        self.stack: Stack | None = None
        self.checks: Checks | None = None
        self.drv: list[VirtioMmioDriver | None] = [None, None, None]
        self.client: socket.socket | None = None

    # -- plumbing -------------------------------------------------------------------------------
    @initialize(versions=st.tuples(*[st.sampled_from([2, 2, 1])] * 3),
                seed=st.integers(0, 2**32 - 1), hold=st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    def build(self, versions: tuple[int, int, int], seed: int, hold: float) -> None:
        self.stack = Stack(versions)
        self.loop.run_until_complete(self.stack.open())
        held = self.start_async(seed, hold)
        self.checks = Checks(self.stack, self.loop, held)

    @property
    def rig(self) -> Stack:
        assert self.stack is not None
        return self.stack

    def act(self, name: str, fn: Callable[[], Any]) -> Any:
        assert self.checks is not None
        return self.checks.step(name, fn)

    def teardown(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
            if self.stack is not None:
                self.stop_async()
                self.loop.run_until_complete(self.rig.close())
        finally:
            self.loop.close()

    def _vmm(self, i: int) -> BusVmm:
        base, size = slice_of(i)
        return BusVmm(self.rig.bus, self.rig.memory.guest, Allocator(base, size))

    def _queue(self, i: int, q: int) -> DriverQueue | None:
        d = self.drv[i]
        if d is None or not d.queues:
            return None
        qs = [x for x in d.queues if x is not None]
        return qs[q % len(qs)] if qs else None

    # -- register level -------------------------------------------------------------------------
    @rule(i=dev_index, off=st.one_of(st.sampled_from(REGISTERS), st.integers(0, 0x1FF)),
          size=st.sampled_from([4, 4, 4, 1, 2, 8, 3]), value=u32)
    def register_write(self, i: int, off: int, size: int, value: int) -> None:
        addr = self.rig.base(i) + off
        self.act("register_write", lambda: self.rig.bus.access(addr, size, True, value))

    @rule(i=dev_index, off=st.one_of(st.sampled_from(REGISTERS), st.integers(0, 0x1FF)),
          size=st.sampled_from([4, 4, 1, 2, 8]))
    def register_read(self, i: int, off: int, size: int) -> None:
        addr = self.rig.base(i) + off
        self.act("register_read", lambda: self.rig.bus.access(addr, size, False))

    @rule(addr=st.one_of(st.integers(WINDOW_BASE - 8, WINDOW_BASE + 3 * WINDOW_SIZE + 8),
                         addresses),
          size=st.sampled_from([1, 2, 4, 8, 0, 3, 16]), write=st.booleans(), data=u32,
          typ=st.sampled_from([1, 1, 1, 0, 2, 7, 8, 5]), count=st.sampled_from([1, 1, 2, 0]),
          ptr=st.booleans())
    def raw_ioreq(self, addr: int, size: int, write: bool, data: int, typ: int, count: int,
                  ptr: bool) -> None:
        req = IoRequest(addr, size, write, data, typ, count, ptr and typ == 1)
        self.act("raw_ioreq", lambda: self.rig.bus.dispatch(req))

    @rule(i=dev_index, features=st.integers(0, (1 << 64) - 1), mask_transport=st.booleans(),
          sizes=st.lists(st.sampled_from([8, 8, 8, 16, 4, 2, 1, 32, 3, 0]), min_size=1, max_size=6),
          ok=st.sampled_from([True, True, True, False]))
    def bring_up(self, i: int, features: int, mask_transport: bool, sizes: list[int],
                 ok: bool) -> None:
        """Linux's probe with any feature set and queue sizes; DRIVER_OK or not."""
        self.drv[i] = None

        def go() -> None:
            d = VirtioMmioDriver(self._vmm(i), Window(self.rig.base(i), WINDOW_SIZE,  # type: ignore[arg-type]
                                                      self.rig.lines[i].irq))
            try:
                d.probe()
                want = features if not mask_transport else features & ((1 << 32) - 1)
                d.negotiate(want)
                nq = len(self.rig.devices[i].queue_max_sizes)
                for q in range(nq):
                    d.setup_queue(q, max(1, sizes[q % len(sizes)]))
                if ok:
                    d.driver_ok()
            except Exception:  # noqa: BLE001 - the device refused a step: that is its right
                return
            self.drv[i] = d
        self.act("bring_up", go)

    @rule(i=dev_index)
    def reset(self, i: int) -> None:
        self.drv[i] = None
        self.act("reset", lambda: self.rig.bus.access(self.rig.base(i) + R.STATUS, 4, True, 0))

    @rule(i=dev_index, bits=st.sampled_from([1, 3, 7, 11, 15, 0x80, 0x40, 0xFF, 0x8B]))
    def status(self, i: int, bits: int) -> None:
        self.act("status", lambda: self.rig.bus.access(self.rig.base(i) + R.STATUS, 4,
                                                         True, bits))

    @rule(i=dev_index, q=st.integers(0, 9))
    def notify(self, i: int, q: int) -> None:
        addr = self.rig.base(i) + R.QUEUE_NOTIFY
        self.act("notify", lambda: self.rig.bus.access(addr, 4, True, q))

    @rule(i=dev_index, extra=st.sampled_from([0, 0, 1, 2, 0xFFFF_FFFF]))
    def interrupt(self, i: int, extra: int) -> None:
        base = self.rig.base(i)

        def go() -> None:
            isr = self.rig.bus.access(base + R.INTERRUPT_STATUS, 4, False)
            self.rig.bus.access(base + R.INTERRUPT_ACK, 4, True, isr | extra)
        self.act("interrupt", go)

    @rule()
    def invalidate(self) -> None:
        self.act("invalidate", lambda: self.rig.bus.dispatch(
            IoRequest(0, 8, True, (1 << 64) - 1, 8)))

    # -- rings ----------------------------------------------------------------------------------
    @precondition(lambda self: any(self.drv))
    @rule(i=dev_index, q=st.integers(0, 7), slot=st.integers(0, 40), addr=addresses,
          length=lengths, flags=st.integers(0, 0xFFFF) | st.sampled_from(
              [0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT,
               VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT]),
          nxt=st.integers(0, 40) | st.integers(0, 0xFFFF), publish=st.booleans(),
          kick=st.booleans())
    def hostile_descriptor(self, i: int, q: int, slot: int, addr: int, length: int, flags: int,
                           nxt: int, publish: bool, kick: bool) -> None:
        """One descriptor written anywhere in the table, optionally made available at once."""
        dq = self._queue(i, q)
        if dq is None:
            return
        dq.raw_desc(slot % dq.size, addr, length, flags, nxt)
        if publish:
            dq.raw_avail(dq.avail_idx, slot % (dq.size + 2))
            dq.avail_idx = (dq.avail_idx + 1) & 0xFFFF
            dq.raw_avail_idx(dq.avail_idx)
        self._kick("hostile_descriptor", i, dq, kick)

    @precondition(lambda self: any(self.drv))
    @rule(i=dev_index, q=st.integers(0, 7), head=st.integers(0, 31),
          parts=st.lists(st.tuples(st.sampled_from(["hdr", "buf", "status", "hostile"]),
                                   addresses, lengths, st.booleans()), min_size=1, max_size=5),
          rtype=st.sampled_from([0, 1, 4, 8]), indirect=st.booleans(),
          table_at=st.one_of(st.none(), addresses), cycle=st.booleans())
    def hostile_chain(self, i: int, q: int, head: int, parts: list[tuple[str, int, int, bool]],
                      rtype: int, indirect: bool, table_at: int | None, cycle: bool) -> None:
        """A chain that looks right (a real header, real buffers) with hostile parts in it;
        with `cycle` its last descriptor links back to its first (a loop)."""
        dq = self._queue(i, q)
        d = self.drv[i]
        if dq is None or d is None:
            return
        mem, alloc = dq.memory, d.vmm.alloc
        descs: list[tuple[int, int, int]] = []
        try:
            for kind, addr, length, write in parts:
                if kind == "hdr":
                    addr, length, write = alloc.alloc(16), 16, False
                    mem.write(addr, BLK_HDR.pack(rtype, 0, 8) if i == 0 else bytes(16))
                elif kind == "buf":
                    addr, length = alloc.alloc(512), 512
                elif kind == "status":
                    addr, length, write = alloc.alloc(1), 1, True
                descs.append((addr, length, VIRTQ_DESC_F_WRITE if write else 0))
            table = alloc.alloc(16 * len(descs)) if table_at is None else table_at
        except MemoryError:
            return
        h = head % dq.size
        if indirect:
            for k, (addr, length, flags) in enumerate(descs):
                last = k + 1 == len(descs)
                link = 0 if cycle and last else k + 1
                if table_at is None:
                    mem.write(table + 16 * k, struct.pack(
                        "<QIHH", addr, length,
                        flags | (0 if last and not cycle else VIRTQ_DESC_F_NEXT), link))
            dq.raw_desc(h, table, 16 * len(descs), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            for k, (addr, length, flags) in enumerate(descs):
                last = k + 1 == len(descs)
                nxt = h if cycle and last else (h + k + 1) % dq.size
                dq.raw_desc((h + k) % dq.size, addr, length,
                            flags | (0 if last and not cycle else VIRTQ_DESC_F_NEXT), nxt)
        dq.raw_avail(dq.avail_idx, h)
        dq.avail_idx = (dq.avail_idx + 1) & 0xFFFF
        dq.raw_avail_idx(dq.avail_idx)
        self._kick("hostile_chain", i, dq, True)

    @precondition(lambda self: any(self.drv))
    @rule(i=dev_index, q=st.integers(0, 7), which=st.sampled_from(["desc", "avail", "used"]),
          off=st.integers(0, 600), data=st.binary(min_size=1, max_size=24), kick=st.booleans())
    def scribble_ring(self, i: int, q: int, which: str, off: int, data: bytes,
                      kick: bool) -> None:
        dq = self._queue(i, q)
        if dq is None:
            return
        base = {"desc": dq.desc_addr, "avail": dq.avail_addr, "used": dq.used_addr}[which]
        dq.memory.write(base + off, data)
        self._kick("scribble_ring", i, dq, kick)

    @precondition(lambda self: any(self.drv))
    @rule(i=dev_index, q=st.integers(0, 7),
          delta=st.sampled_from([1, 2, 15, 16, 17, 0x8000, 0xFFFF, 0x7FFF]))
    def avail_jump(self, i: int, q: int, delta: int) -> None:
        dq = self._queue(i, q)
        if dq is None:
            return
        dq.raw_avail_idx((dq.avail_idx + delta) & 0xFFFF)
        self._kick("avail_jump", i, dq, True)

    def _kick(self, name: str, i: int, dq: DriverQueue, kick: bool) -> None:
        addr = self.rig.base(i) + R.QUEUE_NOTIFY
        self.act(name, (lambda: self.rig.bus.access(addr, 4, True, dq.index)) if kick
                 else (lambda: None))

    # -- well-formed traffic --------------------------------------------------------------------
    @precondition(lambda self: self.drv[0] is not None)
    @rule(rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 10, 99]),
          sector=st.sampled_from([0, 1, 2047, 2048, 4096, (1 << 64) - 1, 1 << 55]),
          n=st.sampled_from([0, 16, 512, 1024, 4096, 100]), indirect=st.booleans(),
          split_header=st.booleans())
    def block_request(self, rtype: int, sector: int, n: int, indirect: bool,
                      split_header: bool) -> None:
        dq = self._queue(0, 0)
        if dq is None:  # the guest took its queue back (queue_off)
            return
        mem, alloc = self.rig.memory.guest, self.drv[0].vmm.alloc  # type: ignore[union-attr]
        try:
            hdr, data, status = alloc.alloc(16), alloc.alloc(max(n, 1)), alloc.alloc(1)
        except MemoryError:
            return
        mem.write(hdr, BLK_HDR.pack(rtype, 0, sector))
        mem.write(status, b"\xff")  # not a status: a late write of one shows (checks.py, 5)
        if rtype in (11, 13) and n >= 16:
            mem.write(data, struct.pack("<QII", sector, 8, 0))
        out = [(hdr, 8), (hdr + 8, 8)] if split_header else [(hdr, 16)]
        in_: list[tuple[int, int]] = []
        if rtype in (1, 11, 13):
            out.append((data, n))
        elif n:
            in_.append((data, n))
        in_.append((status, 1))
        self._add(0, dq, out, in_, indirect)

    @precondition(lambda self: self.drv[1] is not None)
    @rule(what=st.sampled_from(["tx", "rx", "ctrl"]), n=st.sampled_from([0, 10, 12, 14, 60, 1514,
                                                                        1600, 9000]),
          hdr=st.binary(min_size=12, max_size=12), indirect=st.booleans())
    def net_traffic(self, what: str, n: int, hdr: bytes, indirect: bool) -> None:
        q = {"tx": 1, "rx": 0, "ctrl": 2}[what]
        d = self.drv[1]
        assert d is not None
        if q >= len(d.queues) or d.queues[q] is None:
            return
        dq = d.queues[q]
        try:
            buf = d.vmm.alloc.alloc(max(n, 1))
        except MemoryError:
            return
        if what == "tx":
            self.rig.memory.guest.write(buf, (hdr + bytes(n))[:max(n, 1)])
            self._add(1, dq, [(buf, n)], [], indirect)
        elif what == "rx":
            self._add(1, dq, [], [(buf, n)], indirect)
        else:
            self.rig.memory.guest.write(buf, hdr[:max(n, 1)])
            self._add(1, dq, [(buf, min(n, 12))], [(buf + 12, 1)] if n > 12 else [], indirect)

    @precondition(lambda self: self.drv[2] is not None)
    @rule(q=st.integers(0, 5), n=st.sampled_from([0, 1, 8, 9, 64, 4096]),
          msg=st.tuples(st.sampled_from([0, 1, 2, 0xFFFF_FFFF]), st.integers(0, 9),
                        st.sampled_from([0, 1, 2])),
          indirect=st.booleans())
    def console_traffic(self, q: int, n: int, msg: tuple[int, int, int], indirect: bool) -> None:
        d = self.drv[2]
        assert d is not None
        if q >= len(d.queues) or d.queues[q] is None:
            return
        dq = d.queues[q]
        try:
            buf = d.vmm.alloc.alloc(max(n, 8))
        except MemoryError:
            return
        self.rig.memory.guest.write(buf, CTRL.pack(*msg))
        if q in (0, 2, 4):  # receive queues: the device writes
            self._add(2, dq, [], [(buf, n)], indirect)
        else:
            self._add(2, dq, [(buf, n)], [], indirect)

    def _add(self, i: int, dq: DriverQueue, out: list[tuple[int, int]],
             in_: list[tuple[int, int]], indirect: bool) -> None:
        try:
            dq.add(out, in_, token=None, indirect=indirect)
        except (BufferError, ValueError, MemoryError, IndexError, OSError, struct.error):
            return  # the guest's own ring is full or it scribbled over its free list
        except Exception:  # noqa: BLE001 - guest-side: a corrupted free list, not the device
            return
        self._kick(("block_request", "net_traffic", "console_traffic")[i], i, dq, True)

    @rule(i=dev_index)
    def reap(self, i: int) -> None:
        """The guest collects used buffers (its own checks may trip on a scribbled ring)."""
        d = self.drv[i]
        if d is None:
            return
        for dq in d.queues:
            if dq is None:
                continue
            try:
                dq.drain_used()
            except Exception:  # noqa: BLE001 - guest-side: corrupted rings confuse the guest
                self.drv[i] = None
                return

    # -- the outside world ----------------------------------------------------------------------
    @rule(sizes=st.lists(st.sampled_from([0, 1, 13, 14, 60, 1514, 1600, 9000, 65000]),
                         min_size=1, max_size=4), foreign=st.booleans())
    def peer_sends(self, sizes: list[int], foreign: bool) -> None:
        dest = self.rig.net_address

        def go() -> None:
            sock = self.rig.peer
            other = None
            if foreign:
                other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock = other
            try:
                for n in sizes:
                    try:
                        sock.sendto(bytes(range(256)) * (n // 256) + bytes(n % 256), dest)
                    except OSError:
                        pass
            finally:
                if other is not None:
                    other.close()
        self.act("peer_sends", go)
        try:
            while self.rig.peer.recv(70000):
                pass
        except OSError:
            pass

    @rule(action=st.sampled_from(["connect", "send", "close", "half", "reset"]),
          data=st.binary(max_size=64))
    def console_client(self, action: str, data: bytes) -> None:

        def go() -> None:
            if action == "connect" and self.client is None:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(str(self.rig.console_socket))
                c.setblocking(False)
                self.client = c
            elif self.client is not None:
                try:
                    if action == "send":
                        self.client.send(data)
                    elif action == "half":
                        self.client.shutdown(socket.SHUT_WR)
                    else:
                        if action == "reset":
                            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
                        self.client.close()
                        self.client = None
                except OSError:
                    if self.client is not None:
                        self.client.close()
                    self.client = None
        self.act("console_client", go)
        if self.client is not None:
            try:
                while self.client.recv(65536):
                    pass
            except OSError:
                pass

    # -- liveness -------------------------------------------------------------------------------
    @rule(i=dev_index)
    def recover(self, i: int) -> None:
        """After any history: reset, a plain Linux probe and one request; it must complete."""
        assert self.checks is not None
        if i == 2:
            stalls = self.stalls
            if stalls is not None and stalls.stalled:  # liveness needs a backend taking output
                self.act("console_stall", lambda: stalls.set(False))  # (its queue work in a move)
            if self.client is not None:
                self.client.close()
                self.client = None
        self.drv[i] = None
        held = self.held
        if i == 0 and held is not None:  # what is parked comes back; the probe's read is not held
            self.act("finish_io", lambda: held.release(len(held.held)))
            held.paused = True
        try:
            self.drv[i] = self.checks.recover(i, self._vmm(i))
        finally:
            if held is not None:
                held.paused = False
        STATS.recoveries += 1
