"""virtio-blk requests: the wire layout and the single parse step (VIRTIO 1.2, 5.2.6).

`parse()` checks every rule of a request in one place and in a fixed order, Firecracker-style,
and names each failure with a `RequestError` subclass carrying a stable `rule` and the status to
complete the request with. Nothing here touches the backing file: a request that fails parsing
is completed by the device without any I/O. The chain's buffers are resolved to memoryviews only
at I/O time (the guest may change its memory between pop and use; the memory layer checks then).

The layout of a request follows no fixed descriptor arrangement (VIRTIO 1.2 2.6.4: the device
must not assume one): the header is the first 16 driver-readable bytes, the status is the last
device-writable byte, and data is what lies between, in the direction the type dictates.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from vmmiod.virtqueue import DescriptorChain

SECTOR_SIZE = 512  # virtio-blk sectors are 512 bytes whatever blk_size says (5.2.6)
SECTOR_SHIFT = 9
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES

# Request types (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

TYPE_NAMES = {
    VIRTIO_BLK_T_IN: "in", VIRTIO_BLK_T_OUT: "out", VIRTIO_BLK_T_FLUSH: "flush",
    VIRTIO_BLK_T_GET_ID: "get_id", VIRTIO_BLK_T_DISCARD: "discard",
    VIRTIO_BLK_T_WRITE_ZEROES: "write_zeroes",
}

# Status byte values.
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

# struct virtio_blk_req header: le32 type, le32 reserved (ioprio in Linux), le64 sector.
REQ_HEADER = struct.Struct("<IIQ")
REQ_HEADER_SIZE = REQ_HEADER.size  # 16
# struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
DWZ_RANGE = struct.Struct("<QII")
DWZ_RANGE_SIZE = DWZ_RANGE.size  # 16
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

Segment = tuple[int, int]  # (gpa, length)


class RequestError(Exception):
    """A request that breaks a rule: completed with `status`, without touching the backing."""

    rule = "request_error"
    status = VIRTIO_BLK_S_IOERR

    def __init__(self, message: str, status_gpa: int | None = None) -> None:
        super().__init__(message)
        self.status_gpa = status_gpa  # None: the chain has no writable byte for a status


class StatusMissing(RequestError):
    """No device-writable byte at the end of the chain: not even an error can be reported."""

    rule = "status_missing"


class HeaderTooShort(RequestError):
    rule = "header_too_short"


class DataDirection(RequestError):
    """Data in the wrong direction (device-readable data for IN, writable for OUT...)."""

    rule = "data_direction"


class LengthNotMultiple(RequestError):
    rule = "length_not_sector_multiple"


class SectorOutOfRange(RequestError):
    """sector + length runs past the capacity (computed without overflow)."""

    rule = "sector_out_of_range"


class TooManySegments(RequestError):
    rule = "too_many_segments"  # more data descriptors than SEG_MAX


class SegmentTooLarge(RequestError):
    rule = "segment_too_large"  # a data descriptor longer than SIZE_MAX


class ReadOnlyDevice(RequestError):
    rule = "write_to_read_only"


class RangeListLength(RequestError):
    rule = "range_list_length"  # discard/write-zeroes payload not a non-zero multiple of 16


class TooManyRanges(RequestError):
    rule = "too_many_ranges"  # more than max_discard_seg / max_write_zeroes_seg


class RangeTooLarge(RequestError):
    rule = "range_too_large"  # num_sectors above max_discard_sectors / max_write_zeroes_sectors


class UnsupportedFlags(RequestError):
    rule = "unsupported_range_flags"
    status = VIRTIO_BLK_S_UNSUPP  # 5.2.6.2: unknown flags, or unmap on a discard


class UnsupportedType(RequestError):
    rule = "unsupported_type"
    status = VIRTIO_BLK_S_UNSUPP


class Limits:
    """What the device announced in its config space; parse() enforces it."""

    __slots__ = (
        "capacity",
        "discard",
        "max_discard_sectors",
        "max_discard_seg",
        "max_write_zeroes_sectors",
        "max_write_zeroes_seg",
        "readonly",
        "seg_max",
        "size_max",
        "write_zeroes",
    )

    def __init__(self, capacity: int, seg_max: int, size_max: int, readonly: bool,
                 discard: bool, write_zeroes: bool, max_discard_sectors: int,
                 max_discard_seg: int, max_write_zeroes_sectors: int,
                 max_write_zeroes_seg: int) -> None:
        self.capacity = capacity  # in 512-byte sectors
        self.seg_max = seg_max
        self.size_max = size_max
        self.readonly = readonly
        self.discard = discard
        self.write_zeroes = write_zeroes
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_write_zeroes_seg = max_write_zeroes_seg


class Request:
    """One parsed request. `data` are the data segments in the type's direction."""

    __slots__ = ("data", "data_len", "head", "ranges", "sector", "status_gpa", "type")

    def __init__(self, head: int, rtype: int, sector: int, data: list[Segment], data_len: int,
                 status_gpa: int, ranges: list[tuple[int, int, int]] | None = None) -> None:
        self.head = head
        self.type = rtype
        self.sector = sector
        self.data = data
        self.data_len = data_len
        self.status_gpa = status_gpa
        self.ranges = ranges  # discard / write zeroes: (sector, num_sectors, flags)

    def __repr__(self) -> str:
        return (f"Request(head={self.head}, type={TYPE_NAMES.get(self.type, self.type)}, "
                f"sector={self.sector}, data_len={self.data_len})")


def _clip(bufs: Sequence[Segment], start: int, length: int) -> list[Segment]:
    """The part [start, start+length) of a buffer list, as (gpa, len) pieces (empty ones dropped)."""
    out: list[Segment] = []
    for gpa, n in bufs:
        if length <= 0:
            break
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        if take:
            out.append((gpa + start, take))
        length -= take
        start = 0
    return out


def _status_gpa(writable: Sequence[Segment]) -> int | None:
    """Address of the last device-writable byte (zero-length descriptors skipped)."""
    for gpa, n in reversed(writable):
        if n:
            return gpa + n - 1
    return None


def _check_range(sector: int, nbytes: int, limits: Limits, status_gpa: int) -> None:
    if nbytes % SECTOR_SIZE:
        raise LengthNotMultiple(f"data length {nbytes} is not a multiple of 512", status_gpa)
    cap = limits.capacity
    # sector is a guest u64: compare without forming sector + n (no overflow in the check).
    if sector > cap or nbytes >> SECTOR_SHIFT > cap - sector:
        raise SectorOutOfRange(
            f"sectors {sector}+{nbytes >> SECTOR_SHIFT} outside capacity {cap}", status_gpa)


def parse(chain: DescriptorChain, limits: Limits) -> Request:
    """Check every rule of a request, in order; return it or raise the named RequestError."""
    writable = chain.writable
    wlen = chain.writable_len
    # 1. A status byte: the last device-writable byte (5.2.6: u8 status at the end).
    if wlen < 1:
        raise StatusMissing("no device-writable byte for the status")
    last = writable[-1]  # exists: wlen >= 1
    if last[1] == 1:
        status_gpa = last[0]  # the usual shape: a one-byte status descriptor
    else:
        sg = _status_gpa(writable)
        assert sg is not None  # wlen >= 1 means some descriptor has a byte
        status_gpa = sg
    # 2. The header: 16 driver-readable bytes.
    rlen = chain.readable_len
    if rlen < REQ_HEADER_SIZE:
        raise HeaderTooShort(f"{rlen} readable bytes, header needs 16", status_gpa)
    readable = chain.readable
    first = readable[0]
    if first[1] >= REQ_HEADER_SIZE:
        buf, off = chain.memory.locate(first[0], REQ_HEADER_SIZE)
        rtype, _reserved, sector = REQ_HEADER.unpack_from(buf, off)
    else:
        rtype, _reserved, sector = REQ_HEADER.unpack(chain.read(0, REQ_HEADER_SIZE))
    in_len = wlen - 1  # device-writable bytes before the status
    out_len = rlen - REQ_HEADER_SIZE  # driver-readable bytes after the header

    # 3. Per type: direction, length, range, segments. IN and OUT are the hot path: their
    # checks are written out here rather than called (a call costs as much as a check).
    if rtype == VIRTIO_BLK_T_IN:
        if out_len:
            raise DataDirection(f"IN with {out_len} driver-readable data bytes", status_gpa)
        if len(writable) == 2 and writable[0][1] == in_len:
            segs = [writable[0]]  # data, status: the usual shape
        else:
            segs = _clip(writable, 0, in_len)
        data_len = in_len
    elif rtype == VIRTIO_BLK_T_OUT:
        if limits.readonly:
            raise ReadOnlyDevice("OUT on a read-only device", status_gpa)
        if in_len:
            raise DataDirection(f"OUT with {in_len} device-writable data bytes", status_gpa)
        if len(readable) == 2 and readable[0][1] == REQ_HEADER_SIZE:
            segs = [readable[1]]  # header, data: the usual shape
        else:
            segs = _clip(readable, REQ_HEADER_SIZE, out_len)
        data_len = out_len
    else:
        return _parse_other(chain, rtype, sector, out_len, in_len, limits, status_gpa)
    if data_len & (SECTOR_SIZE - 1):
        raise LengthNotMultiple(f"data length {data_len} is not a multiple of 512", status_gpa)
    cap = limits.capacity
    # sector is a guest u64: compare without forming sector + n (no overflow in the check).
    if sector > cap or data_len >> SECTOR_SHIFT > cap - sector:
        raise SectorOutOfRange(
            f"sectors {sector}+{data_len >> SECTOR_SHIFT} outside capacity {cap}", status_gpa)
    if len(segs) > limits.seg_max:
        raise TooManySegments(f"{len(segs)} data segments, SEG_MAX is {limits.seg_max}",
                              status_gpa)
    size_max = limits.size_max
    if data_len > size_max:  # only then can one segment be too large
        for _, n in segs:
            if n > size_max:
                raise SegmentTooLarge(f"data segment of {n} bytes, SIZE_MAX is {size_max}",
                                      status_gpa)
    return Request(chain.head, rtype, sector, segs, data_len, status_gpa)


def _parse_other(chain: DescriptorChain, rtype: int, sector: int, out_len: int, in_len: int,
                 limits: Limits, status_gpa: int) -> Request:
    """Every type but IN and OUT (same rules, same order)."""
    writable = chain.writable
    if rtype == VIRTIO_BLK_T_FLUSH:
        # Data on a flush carries no meaning; QEMU and Linux both ignore it.
        return Request(chain.head, rtype, 0, [], 0, status_gpa)
    if rtype == VIRTIO_BLK_T_GET_ID:
        if out_len:
            raise DataDirection(f"GET_ID with {out_len} driver-readable data bytes", status_gpa)
        segs = _clip(writable, 0, min(in_len, ID_BYTES))
        return Request(chain.head, rtype, 0, segs, min(in_len, ID_BYTES), status_gpa)
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        return _parse_ranges(chain, rtype, sector, out_len, in_len, limits, status_gpa)
    raise UnsupportedType(f"request type {rtype}", status_gpa)


def _parse_ranges(chain: DescriptorChain, rtype: int, sector: int, out_len: int, in_len: int,
                  limits: Limits, status_gpa: int) -> Request:
    discard = rtype == VIRTIO_BLK_T_DISCARD
    offered = limits.discard if discard else limits.write_zeroes
    if not offered:
        raise UnsupportedType(f"request type {rtype} not offered", status_gpa)
    if limits.readonly:
        raise ReadOnlyDevice("discard/write zeroes on a read-only device", status_gpa)
    if in_len:
        raise DataDirection(f"range request with {in_len} device-writable data bytes",
                            status_gpa)
    if out_len == 0 or out_len % DWZ_RANGE_SIZE:
        raise RangeListLength(f"range list of {out_len} bytes", status_gpa)
    count = out_len // DWZ_RANGE_SIZE
    max_seg = limits.max_discard_seg if discard else limits.max_write_zeroes_seg
    max_sectors = limits.max_discard_sectors if discard else limits.max_write_zeroes_sectors
    if count > max_seg:
        raise TooManyRanges(f"{count} ranges, at most {max_seg}", status_gpa)
    payload = chain.read(REQ_HEADER_SIZE, out_len)
    ranges: list[tuple[int, int, int]] = []
    for i in range(count):
        r_sector, r_count, flags = DWZ_RANGE.unpack_from(payload, i * DWZ_RANGE_SIZE)
        known = 0 if discard else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        if flags & ~known:
            raise UnsupportedFlags(f"range {i}: flags {flags:#x}", status_gpa)
        if r_count > max_sectors:
            raise RangeTooLarge(f"range {i}: {r_count} sectors, at most {max_sectors}",
                                status_gpa)
        _check_range(r_sector, r_count << SECTOR_SHIFT, limits, status_gpa)
        ranges.append((r_sector, r_count, flags))
    return Request(chain.head, rtype, sector, [], 0, status_gpa, ranges)
