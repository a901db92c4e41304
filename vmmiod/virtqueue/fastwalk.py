"""Indirect tables read in one go: the shape every driver builds, checked without a loop.

Linux (and every driver we know) fills an indirect table linearly: descriptor i chains to i + 1,
readable descriptors first, the last without NEXT, every descriptor used. `SplitQueue._walk`
unpacks such a table with one struct call and asks `linear_reader(flags)` for a reader of its
shape: a small function, generated once per shape, that checks the `next` fields and the total
length with plain comparisons and builds the chain with no loop (in CPython a loop over three
descriptors costs more than the I/O it describes). A table of any other shape, or one that
breaks a rule, gets no reader or a None from it, and the caller walks it descriptor by
descriptor, which raises the named error. So this module decides nothing about validity: it
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


def _generate(k: int, r: int) -> Reader:
    """Source of a reader for k descriptors, r of them readable (values from one unpack)."""
    nexts = " or ".join(f"v[{4 * i + 3}] != {i + 1}" for i in range(k - 1)) or "False"
    pairs = [f"(v[{4 * i}], v[{4 * i + 1}])" for i in range(k)]
    rlen = " + ".join(f"v[{4 * i + 1}]" for i in range(r)) or "0"
    wlen = " + ".join(f"v[{4 * i + 1}]" for i in range(r, k)) or "0"
    src = (
        "def read(v, mem, head):\n"
        f"    if {nexts}:\n"
        "        return None\n"
        f"    rlen = {rlen}\n"
        f"    wlen = {wlen}\n"
        "    if rlen + wlen >= LEN_LIMIT:\n"
        "        return None\n"
        f"    return DescriptorChain(mem, head, [{', '.join(pairs[:r])}], "
        f"[{', '.join(pairs[r:])}], rlen, wlen)\n"
    )
    from vmmiod.virtqueue.split import DescriptorChain  # split imports this module

    namespace: dict[str, Any] = {"LEN_LIMIT": LEN_LIMIT, "DescriptorChain": DescriptorChain}
    exec(compile(src, f"<virtqueue linear reader k={k} r={r}>", "exec"), namespace)
    reader: Reader = namespace["read"]
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
