"""Protocol fuzzing of the vhost-user adaptor: hypothesis writes message sequences a hostile or
broken front-end could send (bad sizes and versions, fds missing, extra or of the wrong kind,
regions overlapping or unsealed, rings outside memory or misaligned, everything before
SET_OWNER, scribbled rings) to one device's socket, while a second device on the same adaptor is
driven by a well-behaved front-end. After every sequence: no internal error, the hostile
device's socket takes the next front-end, and the other device still completes I/O."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_vhost_user import block_device
from tests.vhost_user_peer import (
    BLK_T_OUT,
    GPA,
    UVA,
    FrontEnd,
    ThreadedVhost,
    blk_request,
    sealed_memfd,
)
from vmmiod.hypervisors.vhost_user import wire as w
from vmmiod.sim.sockets import connect_unix as connect

RAM = 1 << 20
EXAMPLES = int(os.environ.get("VMMIOD_VHOST_FUZZ_EXAMPLES", "300"))
FD_KINDS = ("eventfd", "memfd", "memfd_unsealed", "pipe", "file", "socket")

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
ram_addr = st.one_of(st.integers(GPA - 4096, GPA + RAM + 4096), u64)
uva_addr = st.one_of(st.integers(UVA - 4096, UVA + RAM + 4096).map(lambda a: a & ~0xF), u64)
ring_index = st.sampled_from([0, 0, 0, 0, 1, 3])
fd_kinds = st.lists(st.sampled_from(FD_KINDS), max_size=3)

moves = st.one_of(
    st.tuples(st.just("raw"), st.integers(0, 45), st.sampled_from([1, 0, 2, 5, 9, 0x101]),
              st.binary(max_size=80), fd_kinds),
    st.tuples(st.just("bad_size"), st.sampled_from(sorted(w.REQUEST_NAMES)),
              st.binary(max_size=48)),
    st.tuples(st.just("owner")),
    st.tuples(st.just("features"), st.one_of(st.just(1 << 32 | 1 << 30), u64)),
    st.tuples(st.just("protocol"), st.one_of(st.just(w.PROTOCOL_FEATURES), u64)),
    st.tuples(st.just("mem"), st.sampled_from(["table", "add", "rem"]), ram_addr,
              st.sampled_from([RAM, RAM // 2, 4096, 0, 2**63]), uva_addr,
              st.sampled_from([0, 4096, RAM, 2**62]), fd_kinds),
    st.tuples(st.just("ring_num"), ring_index, st.sampled_from([0, 1, 3, 16, 64, 256, 2**31])),
    st.tuples(st.just("ring_addr"), ring_index, uva_addr, uva_addr, uva_addr,
              st.sampled_from([0, 1])),
    st.tuples(st.just("ring_base"), ring_index, st.sampled_from([0, 5, 65535, 65536])),
    st.tuples(st.just("ring_fd"), st.sampled_from([w.SET_VRING_KICK, w.SET_VRING_CALL,
                                                   w.SET_VRING_ERR]),
              st.integers(0, 0x3FF), fd_kinds),
    st.tuples(st.just("enable"), ring_index, st.integers(0, 2)),
    st.tuples(st.just("get_base"), ring_index),
    st.tuples(st.just("config"), st.sampled_from([w.GET_CONFIG, w.SET_CONFIG]), u32, u32,
              st.binary(max_size=16)),
    st.tuples(st.just("inflight"), st.sampled_from([w.GET_INFLIGHT_FD, w.SET_INFLIGHT_FD]),
              st.sampled_from([0, 4096, 1 << 20]), st.integers(0, 3),
              st.sampled_from([0, 3, 16, 64, 1024]), fd_kinds),
    st.tuples(st.just("start"), ring_index, uva_addr, uva_addr, uva_addr,
              st.sampled_from([0, 4, 16, 64])),
    st.tuples(st.just("scribble"), st.integers(0, RAM - 64), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("kick"), ring_index),
    st.tuples(st.just("pause")),
    st.tuples(st.just("ram"), st.sampled_from([w.REM_MEM_REG, w.ADD_MEM_REG, w.SET_MEM_TABLE])),
    st.tuples(st.just("garbage"), st.sampled_from(["desc", "avail", "used"]),
              st.integers(0, 300), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("simple"), st.sampled_from([w.GET_FEATURES, w.GET_PROTOCOL_FEATURES,
                                                  w.GET_QUEUE_NUM, w.GET_MAX_MEM_SLOTS,
                                                  w.RESET_OWNER, w.RESET_DEVICE, 99])),
)


class Fds:
    """Fresh fds of each kind for one message; the sender keeps none of them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.opened: list[int] = []

    def make(self, kind: str) -> int:
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        elif kind == "memfd":
            fd = sealed_memfd(RAM, "fuzz-ram")
        elif kind == "memfd_unsealed":
            fd = os.memfd_create("fuzz-unsealed", os.MFD_CLOEXEC)
            os.ftruncate(fd, RAM)
        elif kind == "pipe":
            fd, w_ = os.pipe()
            self.opened.append(w_)
        elif kind == "file":
            fd, _ = tempfile.mkstemp(dir=self.tmp)
            os.ftruncate(fd, RAM)
        else:
            a, b = socket.socketpair()
            fd = a.detach()
            b.close()
        self.opened.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.opened:
            os.close(fd)
        self.opened.clear()


def send(fe: FrontEnd, fds: Fds, move: tuple[Any, ...], ram_fd: int) -> None:
    kind = move[0]
    if kind == "raw":
        _, req, flags, payload, kinds = move
        fe.send(req, payload, [fds.make(k) for k in kinds], flags=flags)
    elif kind == "bad_size":
        fe.send(move[1], move[2])
    elif kind == "owner":
        fe.send(w.SET_OWNER)
    elif kind == "features":
        fe.send(w.SET_FEATURES, w.U64.pack(move[1]))
    elif kind == "protocol":
        fe.send(w.SET_PROTOCOL_FEATURES, w.U64.pack(move[1]))
    elif kind == "mem":
        _, how, gpa, size, uva, off, kinds = move
        region = w.MemRegion(gpa, size, uva, off)
        fd_list = [ram_fd] + [fds.make(k) for k in kinds[1:]] if not kinds or \
            kinds[0] == "memfd" else [fds.make(k) for k in kinds]
        if how == "table":
            fe.send(w.SET_MEM_TABLE, w.pack_memory([region] * max(1, len(fd_list))), fd_list)
        else:
            fe.send(w.ADD_MEM_REG if how == "add" else w.REM_MEM_REG, w.pack_mem_reg(region),
                    fd_list)
    elif kind == "ring_num":
        fe.send(w.SET_VRING_NUM, w.STATE.pack(move[1], move[2]))
    elif kind == "ring_addr":
        _, i, desc, used, avail, flags = move
        fe.send(w.SET_VRING_ADDR, w.pack_addr(w.VringAddr(i, flags, desc, used, avail, 0)))
    elif kind == "ring_base":
        fe.send(w.SET_VRING_BASE, w.STATE.pack(move[1], move[2]))
    elif kind == "ring_fd":
        _, req, u, kinds = move
        fe.send(req, w.U64.pack(u), [fds.make(k) for k in kinds])
    elif kind == "enable":
        fe.send(w.SET_VRING_ENABLE, w.STATE.pack(move[1], move[2]))
    elif kind == "get_base":
        fe.send(w.GET_VRING_BASE, w.STATE.pack(move[1], 0))
    elif kind == "config":
        _, req, off, size, data = move
        fe.send(req, w.CONFIG_HEAD.pack(off, size, 0) + data)
    elif kind == "inflight":
        _, req, msize, nq, qs, kinds = move
        payload = w.pack_inflight(w.Inflight(msize, 0, nq, qs))
        fe.send(req, payload, [fds.make(k) for k in kinds] if req == w.SET_INFLIGHT_FD else [])
    elif kind == "start":  # a ring set up and started in one go, addresses anywhere
        _, i, desc, used, avail, num = move
        if num:
            fe.send(w.SET_VRING_NUM, w.STATE.pack(i, num))
        fe.send(w.SET_VRING_ADDR, w.pack_addr(w.VringAddr(i, 0, desc, used, avail, 0)))
        fe.send(w.SET_VRING_KICK, w.U64.pack(i), [fds.make("eventfd")])
    elif kind == "scribble":
        fe.memory.write(GPA + move[1], move[2])
    elif kind == "garbage":  # a hostile driver: bytes anywhere in ring 0, then a kick
        if 0 in fe.rings:
            q = fe.rings[0].q
            base, size = {"desc": (q.desc_addr, 256), "avail": (q.avail_addr, 38),
                          "used": (q.used_addr, 134)}[move[1]]
            blk_request(fe, 0, BLK_T_OUT, 1, b"g" * 512)  # something for the device to walk
            fe.memory.write(base + move[2] % size, move[3])
            fe.kick(0)
            time.sleep(0.005)  # let the device work on it before the next move
    elif kind == "ram":  # the guest RAM itself removed, added again or replaced, rings running
        region = fe.region()
        if move[1] == w.SET_MEM_TABLE:
            fe.send(w.SET_MEM_TABLE, w.pack_memory([region]), [ram_fd])
        else:
            fe.send(move[1], w.pack_mem_reg(region), [ram_fd] if move[1] == w.ADD_MEM_REG else [])
        if 0 in fe.rings:
            fe.kick(0)
            time.sleep(0.005)
    elif kind == "pause":
        time.sleep(0.005)
    elif kind == "kick":
        if move[1] in fe.rings:
            fe.kick(move[1])
    else:
        fe.send(move[1])


def valid_prefix(fe: FrontEnd, depth: int) -> None:
    """What a real front-end sends first (negotiation, memory, a running ring), so that the
    hostile moves after it reach deep states."""
    if depth >= 1:
        fe.negotiate()
    if depth >= 2:
        fe.add_mem_reg()
    if depth >= 3:
        fe.start_ring(0, size=16)


def test_hostile_message_sequences_never_hurt_the_daemon_or_the_other_device(
        tmp_path: Path) -> None:
    victim = block_device(tmp_path, "victim")
    other = block_device(tmp_path, "other")
    vsock, osock = str(tmp_path / "victim.sock"), str(tmp_path / "other.sock")
    with ThreadedVhost([("victim", victim, vsock), ("other", other, osock)]) as d:
        good = FrontEnd(connect(osock))
        good.negotiate()
        good.add_mem_reg()
        good.start_ring(0, size=64)
        ep = d.call(lambda: d.adaptor.endpoint("victim"))  # type: ignore[attr-defined]
        rounds = [0]

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.integers(0, 3), st.lists(moves, min_size=1, max_size=14))
        def run(prefix: int, seq: list[tuple[Any, ...]]) -> None:
            rounds[0] += 1
            fe = FrontEnd(connect(vsock), ram_size=RAM)
            fds = Fds(tmp_path)
            try:
                valid_prefix(fe, prefix)
                for move in seq:
                    send(fe, fds, move, fe.memfd)
                    fds.close()
            except OSError:  # the daemon closed the connection: the sequence is over
                pass
            finally:
                fds.close()
                fe.close()
            deadline = time.monotonic() + 10
            while d.call(lambda: ep.sock is not None):  # the daemon saw the close
                assert time.monotonic() < deadline
                time.sleep(0.002)
            # The other device still serves.
            blk_request(good, 0, BLK_T_OUT, rounds[0] % 64, b"z" * 512, token=rounds[0])
            good.kick(0)
            assert good.wait_used(0) == [(rounds[0], 1)]
            assert d.call(lambda: ep.counters["internal_errors"]) == 0

        run()
        # The hostile device's socket takes a well-behaved front-end afterwards.
        fe = FrontEnd(connect(vsock))
        try:
            fe.negotiate()
            fe.add_mem_reg()
            fe.start_ring(0, size=16)
            blk_request(fe, 0, BLK_T_OUT, 0, b"ok" * 256, token="after")
            fe.kick(0)
            assert fe.wait_used(0) == [("after", 1)]
        finally:
            fe.close()
            good.close()
        reasons = Counter(d.call(lambda: dict(ep.violation_reasons)))
        stats = d.call(lambda: dict(ep.counters))
    print(f"{rounds[0]} sequences; {stats['violations']} violations by reason:",
          dict(reasons.most_common()), f"device faults: {stats['device_faults']}")
    assert stats["internal_errors"] == 0
    assert len(reasons) >= 12  # the fuzzer reaches many different checks
