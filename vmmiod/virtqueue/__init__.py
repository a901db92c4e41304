"""Split virtqueues: the device side, checked against a hostile driver."""

from vmmiod.virtqueue.chain import DescriptorChain
from vmmiod.virtqueue.errors import VirtqueueError
from vmmiod.virtqueue.split import SplitQueue

__all__ = ["DescriptorChain", "SplitQueue", "VirtqueueError"]
