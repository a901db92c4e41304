"""GuestMemory: bounds, wrap, read-only, multi-region views, accessors."""

from __future__ import annotations

import os

import pytest

from vmmiod.memory import (
    AddressWrapError,
    MappedMemory,
    NotContiguousError,
    OutOfBoundsError,
    ReadOnlyError,
    memfd_memory,
)

BASE = 0x4000_0000


def two_regions() -> tuple[MappedMemory, bytearray, bytearray]:
    a, b = bytearray(0x1000), bytearray(0x1000)
    mem = MappedMemory()
    mem.add_buffer(BASE, a)
    mem.add_buffer(BASE + 0x1000, b)  # adjacent: a range may cross
    return mem, a, b


def test_view_is_zero_copy() -> None:
    buf = bytearray(64)
    mem = MappedMemory()
    mem.add_buffer(BASE, buf)
    v = mem.view(BASE + 8, 4, writable=True)
    v[:] = b"abcd"
    assert buf[8:12] == b"abcd"


def test_range_crossing_regions_gives_several_views() -> None:
    mem, a, b = two_regions()
    views = mem.views(BASE + 0xFF0, 0x20, writable=True)
    assert [len(v) for v in views] == [0x10, 0x10]
    mem.write(BASE + 0xFF0, bytes(range(0x20)))
    assert a[0xFF0:] == bytes(range(0x10)) and b[:0x10] == bytes(range(0x10, 0x20))
    assert mem.read(BASE + 0xFF0, 0x20) == bytes(range(0x20))


def test_contiguous_lookup_refuses_crossing() -> None:
    mem, _, _ = two_regions()
    with pytest.raises(NotContiguousError):
        mem.locate(BASE + 0xFFE, 4)


def test_outside_every_region() -> None:
    mem, _, _ = two_regions()
    for gpa, n in [(BASE - 1, 1), (BASE + 0x2000, 1), (0, 4), (BASE + 0x1FFF, 2)]:
        with pytest.raises(OutOfBoundsError):
            mem.views(gpa, n)
    assert mem.rejected == 4


def test_gap_between_regions_is_outside() -> None:
    mem = MappedMemory()
    mem.add_buffer(BASE, bytearray(0x1000))
    mem.add_buffer(BASE + 0x2000, bytearray(0x1000))
    with pytest.raises(OutOfBoundsError):
        mem.views(BASE + 0xFF0, 0x20)


def test_wrap_past_2_64() -> None:
    mem = MappedMemory()
    mem.add_buffer(2**64 - 0x1000, bytearray(0x1000))
    assert len(mem.view(2**64 - 16, 16)) == 16
    with pytest.raises(AddressWrapError):
        mem.views(2**64 - 8, 16)
    with pytest.raises(AddressWrapError):
        mem.read_u64(2**64 - 4)


def test_read_only_region() -> None:
    mem = MappedMemory()
    mem.add_buffer(BASE, bytearray(16), writable=False)
    assert mem.read_u32(BASE) == 0
    with pytest.raises(ReadOnlyError):
        mem.write_u32(BASE, 1)
    with pytest.raises(ReadOnlyError):
        mem.views(BASE, 4, writable=True)


def test_overlapping_regions_refused() -> None:
    mem = MappedMemory()
    mem.add_buffer(BASE, bytearray(0x1000))
    with pytest.raises(OutOfBoundsError):
        mem.add_buffer(BASE + 0x800, bytearray(0x1000))


def test_little_endian_accessors() -> None:
    mem = MappedMemory()
    buf = bytearray(32)
    mem.add_buffer(BASE, buf)
    mem.write_u16(BASE, 0x1234)
    mem.write_u32(BASE + 4, 0x89ABCDEF)
    mem.write_u64(BASE + 8, 0x0102030405060708)
    assert buf[:2] == b"\x34\x12"
    assert buf[4:8] == b"\xef\xcd\xab\x89"
    assert buf[8:16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert (mem.read_u16(BASE), mem.read_u32(BASE + 4), mem.read_u64(BASE + 8)) == (
        0x1234, 0x89ABCDEF, 0x0102030405060708)


def test_zero_length_views_need_no_memory() -> None:
    mem = MappedMemory()
    assert mem.views(0xDEAD_0000, 0) == []


def test_memfd_memory_is_shared_with_the_fd() -> None:
    mem, fd = memfd_memory(0x10000, gpa=BASE)
    try:
        mem.write(BASE + 100, b"shared")
        assert os.pread(fd, 6, 100) == b"shared"
        os.pwrite(fd, b"back", 200)
        assert mem.read(BASE + 200, 4) == b"back"
    finally:
        mem.close()
        os.close(fd)


def test_invalidate_bumps_generation() -> None:
    mem = MappedMemory()
    g = mem.generation
    mem.invalidate()
    assert mem.generation == g + 1



def test_shared_fields_are_stored_without_a_transient_zero() -> None:
    """struct.pack_into zero-fills its target before writing (CPython's s_pack_internal), so a
    ring index written with it reads as 0 for a moment to the other side (the guest, or a VMM
    process): a Linux guest then takes used.idx 0 for thousands of new entries. The accessors
    must store the value in one go. Another process watches the bytes while we store."""
    import mmap
    import time

    shared = mmap.mmap(-1, 4096)
    mem = MappedMemory()
    mem.add_buffer(BASE, shared)
    mem.write_u16(BASE + 2, 0x0101)
    pid = os.fork()
    if pid == 0:  # the other side: count the times the index reads as 0
        view = memoryview(shared)
        zeros = 0
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            for _ in range(5000):
                if view[2] == 0 and view[3] == 0:
                    zeros += 1
        os._exit(min(zeros, 255))
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        for i in range(5000):
            mem.write_u16(BASE + 2, 0x0101 + (i & 0xFF))  # never 0
            mem.write_u32(BASE + 8, 0x01010101 + i)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the other side saw a transient 0"
