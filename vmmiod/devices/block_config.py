"""virtio-blk feature bits and config space (VIRTIO 1.2, 5.2.3 and 5.2.4)."""

from __future__ import annotations

import hashlib
import math
import struct

from vmmiod.devices.block_backend import Backing
from vmmiod.devices.block_request import ID_BYTES, SECTOR_SHIFT
from vmmiod.transport import bit

# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# struct virtio_blk_config up to write_zeroes_may_unmap (5.2.4), 60 bytes: capacity, size_max,
# seg_max, geometry (cylinders, heads, sectors), blk_size, topology (physical_block_exp,
# alignment_offset, min_io_size, opt_io_size), writeback, unused0, num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
# max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3].
BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
CONFIG_WRITEBACK_OFFSET = 32

SIZE_MAX = 1 << 20  # largest data segment offered (Linux splits larger ones)
MAX_RANGE_SECTORS = 1 << 22  # 2 GiB per discard / write-zeroes range
MAX_RANGES = 32  # ranges per discard / write-zeroes request (Linux clamps to 256)


def blk_features(backing: Backing, *, readonly: bool, queues: int) -> int:
    """The device-type feature bits offered for this backing (the base adds the common ones)."""
    f = (bit(VIRTIO_BLK_F_SIZE_MAX) | bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE)
         | bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_CONFIG_WCE))
    if backing.is_block_device:
        f |= bit(VIRTIO_BLK_F_TOPOLOGY)  # a file has no geometry worth reporting
    if readonly:
        f |= bit(VIRTIO_BLK_F_RO)
    else:
        f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)
    if queues > 1:
        f |= bit(VIRTIO_BLK_F_MQ)
    return f


def blk_size(backing: Backing) -> int:
    """The logical block size to announce: the device's, or what O_DIRECT needs on a file."""
    if backing.is_block_device:
        return backing.topology.logical
    return backing.direct_align if backing.direct else 512


def config_space(backing: Backing, *, seg_max: int, writeback: bool, queues: int) -> bytes:
    t = backing.topology
    logical = max(1, t.logical)
    exp = int(math.log2(t.physical // logical)) if t.physical > logical else 0
    granularity = max(1, backing.discard_granularity >> SECTOR_SHIFT)
    return BLK_CONFIG.pack(
        backing.size >> SECTOR_SHIFT, SIZE_MAX, seg_max,
        0, 0, 0,  # geometry: not offered
        blk_size(backing),
        exp, min(255, t.align_offset // logical), min(0xFFFF, t.io_min // logical),
        min(0xFFFFFFFF, t.io_opt // logical),
        1 if writeback else 0, 0, queues,
        MAX_RANGE_SECTORS, MAX_RANGES, granularity,
        MAX_RANGE_SECTORS, MAX_RANGES, 1)


def default_serial(guest: str, device: str) -> str:
    """A stable ASCII GET_ID serial of at most 20 bytes from the guest and device names (names
    may hold any printable character: a longer or non-ASCII one is shortened, its other
    characters made '_', and a hash of the whole added)."""
    s = f"{guest}-{device}"
    if s.isascii() and len(s) <= ID_BYTES:
        return s
    digest = hashlib.sha256(s.encode()).hexdigest()[:8]
    head = "".join(c if c.isascii() else "_" for c in s[:11])
    return f"{head}-{digest}"
