"""virtio-blk against real image files, driven by the guest-side driver model."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.test_block_harness import (  # noqa: F401  (io_engine: the fixture)
    ENGINE,
    GPA,
    UNWRITTEN,
    Guest,
    block_config,
    io_engine,
    open_device,
)
from vmmiod.config import GuestConfig
from vmmiod.devices.block import (
    BLK_CONFIG,
    SIZE_MAX,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
    BlockDevice,
    default_serial,
)
from vmmiod.devices.block_request import (
    REQ_HEADER,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)

pytestmark = pytest.mark.usefixtures("io_engine")  # every test once per engine

SECTORS = 2048  # 1 MiB images
SIZE = SECTORS * 512


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SIZE))
    return p


def make(image: Path, **kw: object) -> tuple[BlockDevice, Guest]:
    gkw = {k: kw.pop(k) for k in ("event_idx", "indirect") if k in kw}
    if "queue_size" in kw:
        gkw["queue_size"] = kw["queue_size"]
    dev = open_device(image, **kw)
    return dev, Guest(dev, **gkw)  # type: ignore[arg-type]


def close(dev: BlockDevice, g: Guest) -> None:
    g.close()
    asyncio.run(dev.close())


def file_bytes(p: Path, off: int, n: int) -> bytes:
    with open(p, "rb") as f:
        f.seek(off)
        return f.read(n)


# -- features and config space --------------------------------------------------------------------
def test_config_space_and_features(image: Path) -> None:
    dev, g = make(image, queues=2, queue_size=128)
    cfg = BLK_CONFIG.unpack(dev.config_bytes())
    assert len(dev.config_bytes()) == 60
    assert cfg[0] == SECTORS  # capacity
    assert cfg[2] == 126  # seg_max = queue size - 2
    assert cfg[11] == 1  # writeback (cache: writeback)
    assert cfg[13] == 2  # num_queues
    f = dev.device_features()
    for b in (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX,
              VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
        assert f >> b & 1
    assert not f >> VIRTIO_BLK_F_RO & 1
    assert not f >> VIRTIO_BLK_F_TOPOLOGY & 1  # a file has no topology to report
    assert dev.queue_max_sizes == (128, 128)
    assert dev.read_config(0, 8) == SECTORS
    close(dev, g)


# -- every request type, byte for byte ------------------------------------------------------------
def test_read_matches_file(image: Path) -> None:
    dev, g = make(image)
    for sector, n in ((0, 512), (7, 4096), (100, 65536), (SECTORS - 8, 4096)):
        r = g.run(VIRTIO_BLK_T_IN, sector, read=n)
        assert r.status == VIRTIO_BLK_S_OK
        assert r.data == file_bytes(image, sector * 512, n)
        assert r.used_len == n + 1
    assert dev.counters["requests_in"] == 4
    assert dev.counters["bytes_read"] == 512 + 4096 + 65536 + 4096
    close(dev, g)


def test_cached_reads_are_counted_inline(image: Path) -> None:
    """With io_uring and the thread pool, a buffered read the page cache holds (the image was
    just written) is done at submission; the device's stats count it (io_inline_reads). The
    sync engine reads inline anyway and counts none; O_DIRECT reads are never done so."""
    dev, g = make(image)
    for sector in (0, 64, 8):
        r = g.run(VIRTIO_BLK_T_IN, sector, read=4096)
        assert r.status == VIRTIO_BLK_S_OK and r.data == file_bytes(image, sector * 512, 4096)
    inline = dev.stats()["io_inline_reads"]
    assert inline == 0 if ENGINE["name"] == "sync" else inline >= 1
    close(dev, g)
    assert dev.stats()["io_inline_reads"] == inline  # kept after the engine is gone


def test_write_lands_in_file(image: Path) -> None:
    dev, g = make(image)
    before = image.read_bytes()
    data = os.urandom(8192)
    r = g.run(VIRTIO_BLK_T_OUT, 33, write=data)
    assert r.status == VIRTIO_BLK_S_OK and r.used_len == 1
    after = image.read_bytes()
    assert after[33 * 512:33 * 512 + 8192] == data
    assert after[:33 * 512] == before[:33 * 512]
    assert after[33 * 512 + 8192:] == before[33 * 512 + 8192:]
    assert dev.counters["bytes_written"] == 8192
    # and reads back through the device
    assert g.run(VIRTIO_BLK_T_IN, 33, read=8192).data == data
    close(dev, g)


@pytest.mark.parametrize("indirect", [False, True])
def test_scattered_buffers_and_split_header(image: Path, indirect: bool) -> None:
    """No assumption on descriptor layout (2.6.4): header split, data in odd pieces."""
    dev, g = make(image)
    hdr = g.buf(REQ_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 5), 16)
    pieces = [os.urandom(n) for n in (512, 1536, 1024)]
    out = [(hdr, 5), (hdr + 5, 11)] + [(g.buf(p, 8), len(p)) for p in pieces]
    st = g.buf(1, 1)
    tok = g.submit_raw(out, [(st, 1)], indirect=indirect)
    g.kick()
    assert g.replies()[tok].status == VIRTIO_BLK_S_OK
    assert file_bytes(image, 5 * 512, 3072) == b"".join(pieces)
    # Read it back into three buffers, the status sharing the last data descriptor.
    hdr = g.buf(REQ_HEADER.pack(VIRTIO_BLK_T_IN, 0, 5), 16)
    a, b, c = g.buf(1024), g.buf(1024), g.buf(1025)
    tok = g.submit_raw([(hdr, 16)], [(a, 1024), (b, 1024), (c, 1025)], indirect=indirect)
    g.kick()
    rep = g.replies()[tok]
    assert rep.status == VIRTIO_BLK_S_OK
    got = g.mem.read(a, 1024) + g.mem.read(b, 1024) + g.mem.read(c, 1024)
    assert got == b"".join(pieces)
    close(dev, g)


def test_flush(image: Path) -> None:
    dev, g = make(image)
    g.run(VIRTIO_BLK_T_OUT, 0, write=b"x" * 512)
    r = g.run(VIRTIO_BLK_T_FLUSH)
    assert r.status == VIRTIO_BLK_S_OK and r.used_len == 1
    assert dev.counters["flushes"] == 1 and dev.counters["requests_flush"] == 1
    assert dev.counters["in_flight"] == 0
    close(dev, g)


def test_get_id(image: Path) -> None:
    dev, g = make(image, serial="DISK-0001")
    r = g.run(VIRTIO_BLK_T_GET_ID, read=20)
    assert r.status == VIRTIO_BLK_S_OK
    assert r.data == b"DISK-0001" + bytes(11)
    close(dev, g)
    dev, g = make(image, guest="web", id="root")
    assert g.run(VIRTIO_BLK_T_GET_ID, read=20).data == b"web-root" + bytes(12)
    close(dev, g)
    long = default_serial("a-very-long-guest-name", "data-disk-1")
    assert len(long.encode()) <= 20
    assert long != default_serial("a-very-long-guest-name", "data-disk-2")
    for guest in ("gäst", "服务器-数据库"):  # valid guest names: the serial stays ASCII
        serial = default_serial(guest, "root")
        assert serial.isascii() and len(serial) <= 20, serial
        assert serial != default_serial(guest, "data")


def test_discard_punches_hole(image: Path) -> None:
    dev, g = make(image)
    blocks_before = os.stat(image).st_blocks
    r = g.run(VIRTIO_BLK_T_DISCARD, ranges=[(256, 512, 0)])  # 256 KiB at 128 KiB
    assert r.status == VIRTIO_BLK_S_OK
    assert file_bytes(image, 256 * 512, 512 * 512) == bytes(512 * 512)
    assert os.stat(image).st_blocks < blocks_before
    with open(image, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 256 * 512
    assert os.path.getsize(image) == SIZE  # size kept
    assert dev.counters["requests_discard"] == 1
    close(dev, g)


def test_write_zeroes_with_and_without_unmap(image: Path) -> None:
    dev, g = make(image)
    before = image.read_bytes()
    blocks0 = os.stat(image).st_blocks
    # Without unmap: zeros, still allocated.
    r = g.run(VIRTIO_BLK_T_WRITE_ZEROES, ranges=[(64, 64, 0)])
    assert r.status == VIRTIO_BLK_S_OK
    assert file_bytes(image, 64 * 512, 64 * 512) == bytes(64 * 512)
    assert os.stat(image).st_blocks == blocks0
    # With unmap, two ranges: zeros and a hole.
    r = g.run(VIRTIO_BLK_T_WRITE_ZEROES, ranges=[(1024, 256, 1), (1536, 8, 0)])
    assert r.status == VIRTIO_BLK_S_OK
    after = image.read_bytes()
    assert after[1024 * 512:1280 * 512] == bytes(256 * 512)
    assert after[1536 * 512:1544 * 512] == bytes(8 * 512)
    assert after[1280 * 512:1536 * 512] == before[1280 * 512:1536 * 512]
    assert os.stat(image).st_blocks < blocks0
    close(dev, g)


# -- boundaries -----------------------------------------------------------------------------------
def test_last_sector_and_one_past(image: Path) -> None:
    dev, g = make(image)
    before = image.read_bytes()
    assert g.run(VIRTIO_BLK_T_IN, SECTORS - 1, read=512).data == before[-512:]
    assert g.run(VIRTIO_BLK_T_OUT, SECTORS - 1, write=b"z" * 512).status == VIRTIO_BLK_S_OK
    r = g.run(VIRTIO_BLK_T_IN, SECTORS, read=512)
    assert r.status == VIRTIO_BLK_S_IOERR
    assert g.run(VIRTIO_BLK_T_IN, SECTORS - 1, read=1024).status == VIRTIO_BLK_S_IOERR
    assert g.run(VIRTIO_BLK_T_OUT, SECTORS, write=b"y" * 512).status == VIRTIO_BLK_S_IOERR
    # A sector so large that sector + length wraps a u64.
    assert g.run(VIRTIO_BLK_T_OUT, 2**64 - 1, write=b"y" * 512).status == VIRTIO_BLK_S_IOERR
    assert g.run(VIRTIO_BLK_T_DISCARD, ranges=[(2**64 - 8, 16, 0)]).status == VIRTIO_BLK_S_IOERR
    after = image.read_bytes()
    assert after[:-512] == before[:-512] and after[-512:] == b"z" * 512
    assert os.path.getsize(image) == SIZE  # nothing written past the end
    assert dev.counters["malformed"] == 5
    assert not g.transport.faults
    close(dev, g)


def test_read_only(image: Path) -> None:
    dev, g = make(image, readonly=True)
    f = dev.device_features()
    assert f >> VIRTIO_BLK_F_RO & 1
    assert not f >> VIRTIO_BLK_F_DISCARD & 1 and not f >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    before = image.read_bytes()
    assert g.run(VIRTIO_BLK_T_OUT, 0, write=b"w" * 512).status == VIRTIO_BLK_S_IOERR
    assert g.run(VIRTIO_BLK_T_DISCARD, ranges=[(0, 8, 0)]).status == VIRTIO_BLK_S_UNSUPP
    assert g.run(VIRTIO_BLK_T_WRITE_ZEROES, ranges=[(0, 8, 0)]).status == VIRTIO_BLK_S_UNSUPP
    assert g.run(VIRTIO_BLK_T_IN, 0, read=512).data == before[:512]
    assert g.run(VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK
    assert image.read_bytes() == before
    close(dev, g)


# -- malformed requests: completed, counted, the file untouched -------------------------------------
def test_malformed_requests_fail_without_io(image: Path) -> None:
    dev, g = make(image, queue_size=16)
    before = image.read_bytes()
    hdr = g.header(VIRTIO_BLK_T_OUT, 0)
    st = g.buf(1, 1)
    cases = {
        "length_not_sector_multiple": ([(hdr, 16), (g.buf(b"a" * 100), 100)], [(st, 1)]),
        "data_direction": ([(hdr, 16), (g.buf(b"a" * 512), 512)], [(g.buf(512), 512), (st, 1)]),
        "header_too_short": ([(hdr, 8)], [(st, 1)]),
    }
    for rule, (out, in_) in cases.items():
        tok = g.submit_raw(out, in_, status_gpa=st)
        g.kick()
        rep = g.replies()[tok]
        assert rep.status == VIRTIO_BLK_S_IOERR, rule
        assert rep.used_len == 1
    # Too many data segments (seg_max = 14 here) through an indirect table.
    segs = [(g.buf(b"s" * 512), 512) for _ in range(15)]
    tok = g.submit_raw([(hdr, 16)] + segs, [(st, 1)], status_gpa=st, indirect=True)
    g.kick()
    assert g.replies()[tok].status == VIRTIO_BLK_S_IOERR
    # No status byte at all: returned with length 0, nothing written.
    tok = g.submit_raw([(hdr, 16), (g.buf(b"q" * 512), 512)], [])
    g.kick()
    assert g.replies()[tok].used_len == 0
    assert dev.counters["malformed"] == 5
    # Unknown type and flags the device does not know: UNSUPP.
    assert g.run(77).status == VIRTIO_BLK_S_UNSUPP
    assert g.run(VIRTIO_BLK_T_DISCARD, ranges=[(0, 8, 1)]).status == VIRTIO_BLK_S_UNSUPP
    assert g.run(VIRTIO_BLK_T_WRITE_ZEROES, ranges=[(0, 8, 2)]).status == VIRTIO_BLK_S_UNSUPP
    assert g.run(VIRTIO_BLK_T_DISCARD, ranges=[]).status == VIRTIO_BLK_S_IOERR
    assert dev.counters["requests_unsupported"] == 1
    assert image.read_bytes() == before
    assert dev.counters["bytes_written"] == 0
    assert not g.transport.faults
    # The device still serves.
    assert g.run(VIRTIO_BLK_T_IN, 0, read=512).data == before[:512]
    close(dev, g)


def test_buffer_outside_guest_memory_faults_device(image: Path) -> None:
    dev, g = make(image)
    hdr = g.header(VIRTIO_BLK_T_IN, 0)
    st = g.buf(1, 1)
    g.submit_raw([(hdr, 16)], [(GPA - 4096, 512), (st, 1)], status_gpa=st)
    g.kick()
    assert len(g.transport.faults) == 1 and dev.failed
    assert g.mem.read(st, 1)[0] == UNWRITTEN
    close(dev, g)


# -- cache modes ----------------------------------------------------------------------------------
def test_writethrough_syncs_every_write_batch(image: Path) -> None:
    dev, g = make(image, cache="writethrough")
    assert BLK_CONFIG.unpack(dev.config_bytes())[11] == 0
    toks = [g.submit(VIRTIO_BLK_T_OUT, 8 * i, write=bytes([i]) * 4096) for i in range(4)]
    g.kick()
    reps = g.replies()
    assert all(reps[t].status == VIRTIO_BLK_S_OK for t in toks)
    assert dev.counters["flushes"] == 1  # one fdatasync covers the batch
    close(dev, g)


def test_config_wce_toggles_writeback(image: Path) -> None:
    dev, g = make(image)
    g.run(VIRTIO_BLK_T_OUT, 0, write=b"a" * 512)
    assert dev.counters["flushes"] == 0
    dev.write_config(32, 1, 0)
    assert dev.read_config(32, 1) == 0
    g.run(VIRTIO_BLK_T_OUT, 0, write=b"b" * 512)
    assert dev.counters["flushes"] == 1
    dev.write_config(32, 1, 1)
    g.run(VIRTIO_BLK_T_OUT, 0, write=b"c" * 512)
    assert dev.counters["flushes"] == 1
    dev.write_config(0, 8, 0)  # capacity is read-only
    assert dev.read_config(0, 8) == SECTORS
    close(dev, g)


def test_without_flush_feature_writes_are_durable(image: Path) -> None:
    dev = open_device(image)
    g = Guest(dev, features=dev.device_features() & ~(1 << VIRTIO_BLK_F_FLUSH))
    g.run(VIRTIO_BLK_T_OUT, 0, write=b"d" * 512)
    assert dev.counters["flushes"] == 1
    close(dev, g)


def test_cache_none_direct_io(image: Path) -> None:
    dev, g = make(image, cache="none")
    if not dev.backing.direct:
        pytest.skip("the filesystem under tmp_path refuses O_DIRECT")
    data = os.urandom(8192)
    assert g.run(VIRTIO_BLK_T_OUT, 16, write=data).status == VIRTIO_BLK_S_OK
    assert g.run(VIRTIO_BLK_T_IN, 16, read=8192).data == data
    # Guest buffers that are not aligned for O_DIRECT go through the bounce buffer.
    hdr = g.header(VIRTIO_BLK_T_OUT, 64)
    odd = g.buf(4096 + 8, 4096) + 8
    g.mem.write(odd, data[:4096])
    st = g.buf(1, 1)
    tok = g.submit_raw([(hdr, 16), (odd, 4096)], [(st, 1)], status_gpa=st)
    g.kick()
    assert g.replies()[tok].status == VIRTIO_BLK_S_OK
    assert file_bytes(image, 64 * 512, 4096) == data[:4096]
    hdr = g.header(VIRTIO_BLK_T_IN, 16)
    tok = g.submit_raw([(hdr, 16)], [(odd, 4096), (st, 1)], status_gpa=st)
    g.kick()
    assert g.replies()[tok].status == VIRTIO_BLK_S_OK
    assert g.mem.read(odd, 4096) == data[:4096]
    close(dev, g)


# -- multiqueue, batching, async worker ------------------------------------------------------------
def test_multiqueue(image: Path) -> None:
    dev, g = make(image, queues=4)
    before = image.read_bytes()
    for q in range(4):
        assert g.run(VIRTIO_BLK_T_IN, q * 8, read=4096, queue=q).data == \
            before[q * 4096:(q + 1) * 4096]
    assert g.transport.used == [0, 1, 2, 3]
    close(dev, g)


def test_batch_completes_with_one_interrupt(image: Path) -> None:
    dev, g = make(image, queue_size=64)
    before = image.read_bytes()
    toks = [g.submit(VIRTIO_BLK_T_IN, i * 8, read=4096) for i in range(32)]
    g.kick()
    reps = g.replies()
    assert [reps[t].data for t in toks] == [before[i * 4096:(i + 1) * 4096] for i in range(32)]
    assert g.transport.used == [0]
    assert dev.counters["interrupts"] == 1
    close(dev, g)


def test_flush_runs_off_the_loop_and_loop_keeps_serving(image: Path) -> None:
    async def main() -> None:
        dev = BlockDevice(block_config(image), GuestConfig("g"))
        await dev.open()
        g = Guest(dev)  # activated inside the loop: completions come back through the engine
        tw = g.submit(VIRTIO_BLK_T_OUT, 0, write=b"f" * 4096)
        tf = g.submit(VIRTIO_BLK_T_FLUSH)
        g.kick()
        await asyncio.sleep(0)  # the notify only scheduled the queue work; let it run
        # The flush (a barrier behind the write) completes through the engine's eventfd, on a
        # later loop turn: the queue work has returned, the flush is not back yet.
        first = g.replies()
        assert tf not in first
        assert dev.counters["in_flight"] >= 1
        rw = first[tw] if tw in first else await g.wait(tw)
        assert rw.status == VIRTIO_BLK_S_OK
        tr = g.submit(VIRTIO_BLK_T_IN, 0, read=4096)
        g.kick()
        assert (await g.wait(tr)).data == b"f" * 4096
        assert (await g.wait(tf)).status == VIRTIO_BLK_S_OK
        assert dev.counters["in_flight"] == 0
        # A reset while a flush is on the worker: its completion is dropped.
        tf2 = g.submit(VIRTIO_BLK_T_FLUSH)
        g.kick()
        await asyncio.sleep(0)
        assert dev.counters["in_flight"] == 1
        dev.reset()
        await asyncio.sleep(0.05)
        assert tf2 not in g.replies()
        g.mem.close()
        await dev.close()

    asyncio.run(main())



def test_zero_length_and_short_get_id(image: Path) -> None:
    dev, g = make(image, serial="0123456789abcdefghij")
    r = g.run(VIRTIO_BLK_T_IN, 3)  # no data at all: nothing to do, OK
    assert r.status == VIRTIO_BLK_S_OK and r.used_len == 1
    assert g.run(VIRTIO_BLK_T_OUT, 3, write=b"").status == VIRTIO_BLK_S_OK
    assert g.run(VIRTIO_BLK_T_GET_ID, read=8).data == b"01234567"  # what fits
    assert g.run(VIRTIO_BLK_T_GET_ID, read=32).data[:21] == b"0123456789abcdefghij\0"
    close(dev, g)


def test_segment_larger_than_size_max(image: Path) -> None:
    """One descriptor longer than SIZE_MAX, inside capacity (the image is 4 MiB here)."""
    with open(image, "ab") as f:
        f.truncate(4 << 20)
    dev, g = make(image)
    hdr = g.header(VIRTIO_BLK_T_IN, 0)
    st = g.buf(1, 1)
    one = g.buf(SIZE_MAX + 512)
    tok = g.submit_raw([(hdr, 16)], [(one, SIZE_MAX + 512), (st, 1)], status_gpa=st)
    g.kick()
    assert g.replies()[tok].status == VIRTIO_BLK_S_IOERR
    assert dev.counters["malformed"] == 1 and dev.counters["bytes_read"] == 0
    # The same length in two descriptors is fine.
    tok = g.submit_raw([(hdr, 16)], [(one, SIZE_MAX), (one + SIZE_MAX, 512), (st, 1)],
                       status_gpa=st)
    g.kick()
    assert g.replies()[tok].status == VIRTIO_BLK_S_OK
    close(dev, g)


@pytest.mark.parametrize("event_idx", [False, True])
def test_notification_suppression_modes(image: Path, event_idx: bool) -> None:
    dev, g = make(image, event_idx=event_idx)
    g.dq[0].disable_interrupts()  # a driver polling its used ring
    r = g.run(VIRTIO_BLK_T_IN, 0, read=512)
    assert r.status == VIRTIO_BLK_S_OK
    if not event_idx:
        assert g.transport.used == []  # NO_INTERRUPT honoured
    g.dq[0].enable_interrupts()
    g.run(VIRTIO_BLK_T_IN, 0, read=512)
    assert g.transport.used[-1:] == [0]
    # A batch that only holds a FLUSH (completed later) raises no empty interrupt.
    before = len(g.transport.used)
    tok = g.submit(VIRTIO_BLK_T_FLUSH)
    g.kick()
    assert g.replies()[tok].status == VIRTIO_BLK_S_OK
    assert len(g.transport.used) == before + 1
    close(dev, g)


def test_full_ring_batch_then_more(image: Path) -> None:
    """A batch as large as the per-turn budget (the ring size) and then more requests: every
    one completes, and the driver is asked to notify again (EVENT_IDX avail_event moves)."""
    dev, g = make(image, queue_size=16)
    before = image.read_bytes()
    toks = [g.submit(VIRTIO_BLK_T_IN, i, read=512) for i in range(16)]
    g.kick()
    reps = g.replies()
    assert [reps[t].data for t in toks] == [before[i * 512:(i + 1) * 512] for i in range(16)]
    for round_ in range(3):
        tok = g.submit(VIRTIO_BLK_T_IN, 100 + round_, read=512)
        g.kick()
        assert g.replies()[tok].status == VIRTIO_BLK_S_OK
    close(dev, g)


def test_budget_yields_to_the_loop(image: Path) -> None:
    """With a loop, a full ring is served in turns of at most `size` chains (others run between)."""
    async def main() -> None:
        dev = BlockDevice(block_config(image, queue_size=16), GuestConfig("g"))
        await dev.open()
        g = Guest(dev, queue_size=16)
        toks = [g.submit(VIRTIO_BLK_T_IN, i, read=512) for i in range(16)]
        g.kick()
        for _ in range(3):
            await asyncio.sleep(0)
        for t in toks:  # the completions come back through the engine, on later turns
            assert (await g.wait(t)).status == VIRTIO_BLK_S_OK
        tok = g.submit(VIRTIO_BLK_T_IN, 0, read=512)
        g.kick()
        assert (await g.wait(tok)).status == VIRTIO_BLK_S_OK
        g.mem.close()
        await dev.close()

    asyncio.run(main())
