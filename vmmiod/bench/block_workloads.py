"""The page-cache workloads of the block benchmark, shared by block.py and block_stack.py."""

from __future__ import annotations

import random

from vmmiod.devices.block_request import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT

QUEUE_SIZE = 128
KIB4 = 4096
MIB1 = 1 << 20
WORKLOADS = (("rand-read-4k", VIRTIO_BLK_T_IN, KIB4, True),
             ("rand-write-4k", VIRTIO_BLK_T_OUT, KIB4, True),
             ("seq-read-1m", VIRTIO_BLK_T_IN, MIB1, False),
             ("seq-write-1m", VIRTIO_BLK_T_OUT, MIB1, False))


def _offsets(size: int, block: int, count: int, rand: bool, seed: int = 1) -> list[int]:
    slots = size // block
    if rand:
        rng = random.Random(seed)
        return [rng.randrange(slots) * block for _ in range(count)]
    return [(i % slots) * block for i in range(count)]
