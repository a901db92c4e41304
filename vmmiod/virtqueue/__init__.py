"""Split virtqueues: the device side, checked against a hostile driver."""

from vmmiod.virtqueue.errors import VirtqueueError
from vmmiod.virtqueue.split import DescriptorChain, SplitQueue

__all__ = ["DescriptorChain", "SplitQueue", "VirtqueueError"]
