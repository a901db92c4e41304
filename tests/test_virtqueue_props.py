"""Property tests of the split virtqueue (hypothesis).

- Any valid sequence of chains round-trips exactly, through wrap-around of the 16-bit indexes.
- Any hostile descriptor table and ring contents only ever produce the named errors, never read
  or write outside guest memory, and finish within a bounded number of steps. The hostile test
  runs HOSTILE_EXAMPLES examples (20,000 in CI; VMMIOD_HOSTILE_EXAMPLES overrides).
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.vq_helpers import BASE, make_rig
from vmmiod.memory import GuestMemoryError
from vmmiod.virtqueue import VirtqueueError
from vmmiod.virtqueue.split import DESC

HOSTILE_EXAMPLES = int(os.environ.get("VMMIOD_HOSTILE_EXAMPLES", "20000"))
RAM = 0x40000

chain_spec = st.tuples(
    st.lists(st.binary(min_size=0, max_size=48), min_size=0, max_size=4),  # driver-readable
    st.lists(st.integers(1, 48), min_size=0, max_size=3),  # device-writable sizes
    st.booleans(),  # indirect
).filter(lambda c: len(c[0]) + len(c[1]) > 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chains=st.lists(chain_spec, min_size=1, max_size=40),
    size=st.sampled_from([4, 8, 16]),
    event_idx=st.booleans(),
    start=st.one_of(st.just(0), st.integers(65520, 65535), st.integers(0, 65535)),
)
def test_valid_chains_round_trip(chains: list, size: int, event_idx: bool, start: int) -> None:
    rig = make_rig(size=size, event_idx=event_idx, indirect=True, start_index=start)
    drv, q = rig.driver, rig.queue
    pending = list(enumerate(chains))
    while pending:
        batch = []
        while pending:
            token, (outs, ins, indirect) = pending[0]
            indirect = indirect or len(outs) + len(ins) > size  # as Linux does for long chains
            need = 1 if indirect and len(outs) + len(ins) > 1 else len(outs) + len(ins)
            if drv.num_free < need:
                break
            pending.pop(0)
            out_bufs = []
            for data in outs:
                gpa = rig.alloc.alloc(max(len(data), 1), 8)
                rig.memory.write(gpa, data)
                out_bufs.append((gpa, len(data)))
            in_bufs = [(rig.alloc.alloc(n, 8), n) for n in ins]
            drv.add(out_bufs, in_bufs, token=token, indirect=indirect)
            batch.append((token, outs, in_bufs))
        assert batch, "the driver model must always fit at least one chain"
        drv.kick_prepare()
        for token, outs, in_bufs in batch:
            chain = q.pop()
            assert chain is not None
            assert chain.read() == b"".join(outs)
            assert chain.writable_len == sum(n for _, n in in_bufs)
            reply = bytes((token + i) & 0xFF for i in range(chain.writable_len))
            assert chain.write(reply) == len(reply)
            q.add_used(chain.head, len(reply))
        assert q.pop() is None
        q.publish_used()
        for token, outs, in_bufs in batch:
            got = drv.get_used()
            assert got is not None and got[0] == token
            expected = bytes((token + i) & 0xFF for i in range(got[1]))
            assert b"".join(rig.memory.read(g, n) for g, n in in_bufs) == expected
        assert drv.get_used() is None
    assert q.in_flight() == 0
    assert rig.guards_intact()


# -- hostile ------------------------------------------------------------------------------------------
def addr_strategy(size: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(BASE, BASE + RAM - 1),  # inside RAM
        st.integers(BASE + RAM - 64, BASE + RAM + 64),  # around the end
        st.integers(BASE - 64, BASE + 64),  # around the start
        st.integers(0, 2**64 - 1),  # anywhere, including near the wrap
        st.integers(2**64 - 64, 2**64 - 1),
    )


def desc_strategy(size: int) -> st.SearchStrategy[tuple[int, int, int, int]]:
    return st.tuples(
        addr_strategy(size),
        st.one_of(st.integers(0, 96), st.sampled_from([16, 32, 48, 2**32 - 1, 2**31]),
                  st.integers(0, 2**32 - 1)),
        st.integers(0, 7),  # NEXT | WRITE | INDIRECT in any combination
        st.one_of(st.integers(0, size + 2), st.integers(0, 0xFFFF)),
    )


SIZES = (1, 2, 4, 8, 16)
# Strategies are built once: building them per example costs more than running the example.
DESC_TABLES = {n: st.lists(desc_strategy(n), min_size=n, max_size=n) for n in SIZES}
RINGS = {n: st.lists(st.integers(0, n + 2), min_size=n, max_size=n) for n in SIZES}
DELTAS = {n: st.one_of(st.integers(0, n), st.integers(0, 0xFFFF)) for n in SIZES}
INDIRECT_TABLES = st.lists(st.lists(desc_strategy(8), min_size=1, max_size=8),
                           min_size=0, max_size=2)


@st.composite
def hostile_queue(draw: st.DrawFn) -> dict:
    size = draw(st.sampled_from(SIZES))
    return {
        "size": size,
        "descs": draw(DESC_TABLES[size]),
        # Indirect tables the descriptors may point at (placed at fixed addresses).
        "tables": draw(INDIRECT_TABLES),
        "ring": draw(RINGS[size]),
        "avail_delta": draw(DELTAS[size]),
        "event_idx": draw(st.booleans()),
        "indirect": draw(st.booleans()),
        "start": draw(st.one_of(st.just(0), st.integers(0, 0xFFFF))),
        "used_event": draw(st.integers(0, 0xFFFF)),
    }


TABLE_AT = [BASE + 0x30000, BASE + 0x31000]


@settings(max_examples=HOSTILE_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(h=hostile_queue())
def test_hostile_rings_only_raise_named_errors(h: dict) -> None:
    size = h["size"]
    rig = make_rig(size=size, event_idx=h["event_idx"], indirect=h["indirect"],
                   ram=RAM, start_index=h["start"])
    mem = rig.memory
    drv = rig.driver
    for i, d in enumerate(h["descs"]):
        drv.raw_desc(i, *d)
    for t, table in enumerate(h["tables"]):
        for i, d in enumerate(table):
            buf, off = mem.locate(TABLE_AT[t] + 16 * i, 16, True)
            DESC.pack_into(buf, off, *d)
    for slot, head in enumerate(h["ring"]):
        drv.raw_avail(h["start"] + slot, head)
    drv.raw_avail_idx(h["start"] + h["avail_delta"])
    mem.write(drv.avail_addr + 4 + 2 * size, struct.pack("<H", h["used_event"]))

    q = rig.queue
    max_descs = size + 65536  # main table budget plus one indirect table at most
    popped = 0
    for _ in range(size + 2):  # more pops than the ring can hold: must end by itself
        try:
            chain = q.pop()
        except VirtqueueError as exc:
            assert type(exc).__name__ != "VirtqueueError"  # always a named subclass
            break
        if chain is None:
            break
        popped += 1
        assert len(chain.readable) + len(chain.writable) <= max_descs
        assert chain.readable_len + chain.writable_len < 2**32
        try:
            chain.read()
            chain.write(b"\x5a" * min(chain.writable_len, 4096))
        except GuestMemoryError:
            pass
        try:
            q.add_used(chain.head, 0)
            q.publish_used()
        except VirtqueueError:
            break
    assert popped <= size
    assert rig.guards_intact(), "the device wrote outside guest memory"
