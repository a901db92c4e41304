"""Indirect tables read in one go: the shape every driver builds, checked without a loop.

Linux (and every driver we know) fills an indirect table linearly: descriptor i chains to i + 1,
readable descriptors first, the last without NEXT, every descriptor used. `SplitQueue.pop`
unpacks such a table with one struct call and asks `linear_reader(flags)` for a reader of its
shape: a DescriptorChain subclass, generated once per shape, whose constructor checks the `next`
fields and the total length with plain comparisons and fills the chain with no loop (in CPython
a loop over three descriptors costs more than the I/O it describes). A table of any other shape
gets no reader; one that breaks a rule makes the reader raise NotThisShape; either way the
caller walks it descriptor by descriptor, which raises the named error. So this module decides nothing about validity: it
only recognises chains that the full walk would accept, and returns exactly what it would.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

FAST_TABLE_MAX = 32  # descriptors; larger tables take the full walk
LEN_LIMIT = 1 << 32
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2

# One struct per table size: addr, len, flags, next for each descriptor, in one unpack.
TABLE_STRUCTS = [struct.Struct("<" + "QIHH" * k) for k in range(FAST_TABLE_MAX + 1)]

Reader = Callable[[tuple[int, ...], Any, int], Any]
READERS: dict[tuple[int, ...], Reader] = {}  # linear shapes seen, by flags
_not_linear: set[tuple[int, ...]] = set()


def _readable_count(flags: tuple[int, ...]) -> int | None:
    """Readable descriptors in a linear shape with these flags, or None if it is not one."""
    k = len(flags)
    if k == 0:
        return None
    r = 0
    while r < k and flags[r] & VIRTQ_DESC_F_WRITE == 0:
        r += 1
    for i, f in enumerate(flags):
        want = (VIRTQ_DESC_F_WRITE if i >= r else 0) | (VIRTQ_DESC_F_NEXT if i < k - 1 else 0)
        if f != want:
            return None
    return r


class NotThisShape(Exception):
    """Raised by a reader whose table breaks a rule after all: the caller walks it in full."""


def _generate(k: int, r: int) -> Reader:
    """A reader for k descriptors, r of them readable: a DescriptorChain subclass whose
    constructor takes the values of one unpack (one Python frame per chain, not two)."""
    nexts = " or ".join(f"v[{4 * i + 3}] != {i + 1}" for i in range(k - 1)) or "False"
    pairs = [f"(v[{4 * i}], v[{4 * i + 1}])" for i in range(k)]
    rlen = " + ".join(f"v[{4 * i + 1}]" for i in range(r)) or "0"
    wlen = " + ".join(f"v[{4 * i + 1}]" for i in range(r, k)) or "0"
    src = (
        "def __init__(self, v, memory, head):\n"
        f"    if {nexts}:\n"
        "        raise NotThisShape\n"
        f"    rlen = {rlen}\n"
        f"    wlen = {wlen}\n"
        "    if rlen + wlen >= LEN_LIMIT:\n"
        "        raise NotThisShape\n"
        "    self.memory = memory\n"
        "    self.head = head\n"
        f"    self.readable = [{', '.join(pairs[:r])}]\n"
        f"    self.writable = [{', '.join(pairs[r:])}]\n"
        "    self.readable_len = rlen\n"
        "    self.writable_len = wlen\n"
    )
    from vmmiod.virtqueue.chain import DescriptorChain

    namespace: dict[str, Any] = {"LEN_LIMIT": LEN_LIMIT, "NotThisShape": NotThisShape}
    # The source is built from two small integers of this module, never from guest data.
    exec(compile(src, f"<virtqueue linear chain k={k} r={r}>", "exec"), namespace)  # noqa: S102
    cls = type(f"LinearChain{k}r{r}", (DescriptorChain,),
               {"__slots__": (), "__init__": namespace["__init__"], "__module__": __name__})
    reader: Reader = cls
    return reader


def linear_reader(flags: tuple[int, ...]) -> Reader | None:
    """The reader for a table with these flags, or None when the shape is not linear.

    Readers are kept per shape (a bounded number: a linear shape is its size and its count of
    readable descriptors). Non-linear flag tuples are remembered too, up to a bound, so that a
    driver showing them again costs a set lookup; past the bound each costs one check.
    """
    reader = READERS.get(flags)
    if reader is not None or flags in _not_linear:
        return reader
    r = _readable_count(flags)
    if r is None:
        if len(_not_linear) < 4096:
            _not_linear.add(flags)
        return None
    reader = _generate(len(flags), r)
    READERS[flags] = reader  # at most (FAST_TABLE_MAX + 1) * (FAST_TABLE_MAX + 2) / 2 shapes
    return reader
