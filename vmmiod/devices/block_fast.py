"""virtio-blk's batch fast path: a notification's plain reads and writes in one tight loop.

`BlockDevice.process_queue` first hands the queue to `handle_tables`: it pops a run of chains of
the shape Linux sends (one indirect table: header, data, status; vmmiod/virtqueue/batch.py)
and turns each plain read or write among them into its engine op right there, with the checks
of `parse` (block_request.py) for exactly that shape written out: a 16-byte header, a one-byte
status, one data buffer in the type's direction, a non-zero multiple of 512 bytes, inside the
capacity and SIZE_MAX. Whatever else was popped in the run (another type, another layout, any
rule broken) becomes the same DescriptorChain `SplitQueue.pop` would have returned and goes
through `parse` and `BlockDevice._handle` as always, so every rule keeps its named error and
its status. The chains `pop_tables` leaves (another shape, a hostile entry) are popped by
`SplitQueue.pop` after it. A value read from guest memory (the header, the status address) is
read once and used as read; the memory layer checks every address when it is used.

A buffered read the page cache holds in full is answered right here: one preadv2(RWF_NOWAIT)
into the guest's buffer, the status byte, and its used element with the run's others, at the
end (published by `BlockDevice._end_batch` with the notification's other answers): no Request,
Pending or Op, no engine round. It shares the engine's back-off and ordering rules
(vmmiod/blockio/inline.py: not behind a FLUSH, not after misses); one it does not answer takes
the usual path to the engine, which then does not try it again.
"""

from __future__ import annotations

from vmmiod.blockio import READ, WRITE, Op
from vmmiod.blockio.inline import may_try, nowait_read
from vmmiod.devices.block_io import BlockIo, Pending
from vmmiod.devices.block_request import (
    REQ_HEADER,
    REQ_HEADER_SIZE,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Limits,
    Request,
)
from vmmiod.memory import GuestMemory
from vmmiod.virtqueue import SplitQueue
from vmmiod.virtqueue.fastwalk import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, linear_reader

_READABLE = VIRTQ_DESC_F_NEXT  # header, or the data of a write
_WRITABLE = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE  # the data of a read
_STATUS = VIRTQ_DESC_F_WRITE


def handle_tables(dev: BlockIo, index: int, q: SplitQueue, mem: GuestMemory,
                  limits: Limits, budget: int) -> int:
    """Pop and handle up to `budget` requests of the common shape; returns how many."""
    batch = q.pop_tables(budget)
    if not batch:
        return 0
    gen = q.generation
    locate, views_of, unpack_header = mem.locate, mem.views, REQ_HEADER.unpack_from
    cap, size_max, readonly = limits.capacity, limits.size_max, limits.readonly
    b = dev.backing
    engine = dev.engine
    assert engine is not None
    submit = engine.submit
    direct, align, fd, buffered_fd = b.direct, b.direct_align, b.fd, b.buffered_fd
    writethrough = dev._writethrough
    n_in = n_out = read_bytes = 0
    answered: list[int] = []  # head, length... of the reads the page cache answered here
    try:
        for head, v in batch:
            a0, l0, f0, _, a1, l1, f1, _, a2, l2, f2, _ = v
            if (l0 == REQ_HEADER_SIZE and l2 == 1 and f0 == _READABLE and f2 == _STATUS
                    and l1 and not l1 & (SECTOR_SIZE - 1) and l1 <= size_max):
                hbuf, hoff = locate(a0, REQ_HEADER_SIZE)
                rtype, _, sector = unpack_header(hbuf, hoff)
                if f1 == _WRITABLE:
                    ok = rtype == VIRTIO_BLK_T_IN
                else:  # _READABLE (the only other linear flags with this header and status)
                    ok = rtype == VIRTIO_BLK_T_OUT and not readonly
                if ok and sector <= cap and l1 >> SECTOR_SHIFT <= cap - sector:
                    write = rtype == VIRTIO_BLK_T_OUT
                    views = views_of(a1, l1, not write)
                    offset = sector << SECTOR_SHIFT
                    odirect = direct and not (offset | l1) % align
                    if not (write or odirect) and may_try(engine) and not engine.inline_skip:
                        try:
                            hit = nowait_read(engine, buffered_fd, views, offset, l1)
                        except (TypeError, ValueError):  # a buffer preadv refuses: the engine's
                            hit = False
                        if hit:  # answered now: no request, op or engine round
                            sbuf, soff = locate(a2, 1, True)
                            sbuf[soff] = VIRTIO_BLK_S_OK
                            answered += (head, l1 + 1)
                            n_in += 1
                            read_bytes += l1
                            continue
                        # The op below meets read_inline, which takes this back and tries nothing.
                        engine.inline_skip += 1
                    req = Request(head, rtype, sector, [(a1, l1)], l1, a2)
                    if write:
                        n_out += 1
                        p = Pending(index, gen, req, 1, 1, writethrough)
                    else:
                        n_in += 1
                        p = Pending(index, gen, req, l1 + 1)
                    if odirect:
                        op = Op(WRITE if write else READ, fd, views, offset, l1, p, False, True)
                    else:
                        op = Op(WRITE if write else READ, buffered_fd, views, offset, l1, p)
                    dev._inflight_q[index] += 1
                    dev.counters["in_flight"] += 1
                    submit(op)
                    continue
            # Anything else: the chain pop() would have returned, through the usual path.
            reader = linear_reader((f0, f1, f2))
            assert reader is not None  # pop_tables took only linear tables
            chain = reader(v, mem, head)
            chain.generation = gen
            dev._handle(index, q, mem, limits, chain)
        if answered:  # published with the notification's other answers (BlockDevice._end_batch)
            if len(answered) == 2:
                q.add_used(answered[0], answered[1])
            else:
                q.add_used_run(answered)
    finally:
        c = dev.counters
        c["requests_in"] += n_in
        c["requests_out"] += n_out
        c["bytes_read"] += read_bytes
    return len(batch)
