"""A lone completion reaped in a few lines and answered first (the io_uring engine).

At queue depth 1 every completion wakes the loop alone, and the guest waits for its answer
through the general path: the reap loop, the engine's done list and delivery, the handler's
batch completion. Each step costs little, but a request's code and objects are cold after the
wait for the disk (docs/vhost-user.md, "Per-request cost"), so the steps add up to about a
tenth of a virtualized guest's round trip. When the engine's owner gives a `lone` hook, a
wake-up that finds exactly one CQE, for a plain read or write that transferred all of its bytes,
with nothing else in the engine's hands (no result of a helper thread, nothing reaped and not
delivered, nothing behind a barrier or waiting for ring space, no completion poll running), is
handed straight to the hook, which answers the guest (status, used element, interrupt) and
returns True; the engine's bookkeeping of the op (its tag, the ring's head, its counts) follows.
The hook must submit nothing. A hook that declines gets the op delivered the usual way, and any
other wake-up takes the general path from the start. A hook that resets its device (a guest
fault) cancels the op, which reaps the ring: the CQE is then the cancel's, not this module's.
"""

from __future__ import annotations

from typing import Any

from vmmiod import barrier
from vmmiod.blockio.op import WRITE
from vmmiod.blockio.uring import CQE, CQE_SIZE, U32


def reap_lone(engine: Any) -> bool:  # a UringEngine (which imports this module)
    """True when the wake-up's one completion was reaped (and answered, or delivered) here;
    False, having touched nothing: the caller serves the wake-up the general way."""
    lone = engine.lone
    if (lone is None or engine._poll_from or engine._quiet or engine._done or engine._raw
            or engine._results or engine._holding or engine._blocked or engine._backlog):
        return False
    ring = engine.ring
    cq = ring.cq
    head: int = U32.unpack_from(cq, ring._cq_head_off)[0]
    if (U32.unpack_from(cq, ring._cq_tail_off)[0] - head) & 0xFFFFFFFF != 1:
        return False
    barrier.rmb()  # the CQE is read after the tail that published it
    tag, res, _flags = CQE.unpack_from(cq, ring._cqes_off + (head & ring.cq_mask) * CQE_SIZE)
    tags = engine._tags
    op = tags.get(tag)
    if (op is None or res <= 0 or res != op.length or op.kind > WRITE or op.done
            or op.bounce is not None or op.cancelled or op.barrier):
        return False  # an error, a short transfer, a cancel: the general path's `_result`
    op.result = res
    answered = lone(op)  # the guest's answer first; the engine's bookkeeping after it
    if tags.get(tag) is not op:
        # The hook found the guest at fault and reset the device, whose cancel reaped the
        # ring (this CQE included) and dropped the op: nothing is left to do here.
        return True
    del tags[tag]
    barrier.rmb()  # the CQE is read before the head store that frees its slot
    U32.pack_into(cq, ring._cq_head_off, (head + 1) & 0xFFFFFFFF)
    engine._owed -= 1
    engine._reaped += 1
    engine._inflight -= 1
    op.keep = None
    op.views = []  # no reference to the caller's memory outlives the op
    engine._live.discard(op)
    if not answered:
        engine._done.append(op)
        engine._serve()
    return True
