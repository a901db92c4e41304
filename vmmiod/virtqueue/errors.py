"""Named errors of the split virtqueue: one class per rule a hostile driver can break.

Every error a queue raises is a `VirtqueueError`; the device above turns it into
DEVICE_NEEDS_RESET with a `guest_protocol_violation` log event. Guest-memory errors met while
walking rings are wrapped into `RingAccessError` so callers need catch only this family.
"""

from __future__ import annotations


class VirtqueueError(Exception):
    """Base of every virtqueue error. `rule` is a stable snake_case name for logs and tests."""

    rule = "virtqueue_error"


# -- configuration (checked when the queue is made ready / activated) -----------------------------
class QueueConfigError(VirtqueueError):
    rule = "queue_config"


class InvalidQueueSize(QueueConfigError):
    rule = "invalid_queue_size"


class MisalignedRing(QueueConfigError):
    rule = "misaligned_ring"


class RingOutsideMemory(QueueConfigError):
    rule = "ring_outside_memory"


class QueueNotReady(VirtqueueError):
    rule = "queue_not_ready"


# -- avail ring --------------------------------------------------------------------------------------
class AvailIndexJump(VirtqueueError):
    """avail.idx moved further than the queue size from the last index seen."""

    rule = "avail_index_jump"


class HeadOutOfRange(VirtqueueError):
    rule = "head_out_of_range"


class HeadInFlight(VirtqueueError):
    """The driver made a head available again before the device returned it."""

    rule = "head_in_flight"


# -- descriptor chains -------------------------------------------------------------------------------
class NextOutOfRange(VirtqueueError):
    rule = "next_out_of_range"


class ChainTooLong(VirtqueueError):
    """More descriptors visited than the table holds: a loop."""

    rule = "chain_too_long"


class IndirectNotNegotiated(VirtqueueError):
    rule = "indirect_not_negotiated"


class IndirectBadLength(VirtqueueError):
    rule = "indirect_bad_length"


class NestedIndirect(VirtqueueError):
    rule = "nested_indirect"


class IndirectWithNext(VirtqueueError):
    rule = "indirect_with_next"


class ChainLengthOverflow(VirtqueueError):
    rule = "chain_length_overflow"


class ReadableAfterWritable(VirtqueueError):
    rule = "readable_after_writable"


class RingAccessError(VirtqueueError):
    """A ring or descriptor table could not be read or written in guest memory."""

    rule = "ring_access"


# -- used ring ---------------------------------------------------------------------------------------
class UsedIdNotInFlight(VirtqueueError):
    """The device tried to return a head it does not hold (a device bug, not the guest's)."""

    rule = "used_id_not_in_flight"
