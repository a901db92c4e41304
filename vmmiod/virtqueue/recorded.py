"""A split virtqueue that keeps a restart record (vmmiod/virtqueue/record.py) as it goes.

The window builds its queues from this class. Without a record attached (tests, benchmarks, a
daemon that could not open its record file) it is a plain SplitQueue with one attribute test
more per call; with one, every pop (a batch's too), completion, give-back and publish is
written down before the guest can see its effect, and `resume()` takes a queue over from a dead
daemon's record.
"""

from __future__ import annotations

from vmmiod.virtqueue.batch import Table
from vmmiod.virtqueue.chain import DescriptorChain
from vmmiod.virtqueue.record import IN_FLIGHT, QueueRecord, Recovered, recover_rings
from vmmiod.virtqueue.split import SplitQueue


class RecordedQueue(SplitQueue):
    def reset(self) -> None:
        super().reset()
        # Forget the record without touching it: the window records the reset itself, and a
        # daemon stopping for a restart resets its queues without recording that.
        self._rec: QueueRecord | None = None

    def attach_record(self, rec: QueueRecord) -> None:
        """Keep a record from now on (a queue just enabled: nothing in flight)."""
        rec.start(self.next_avail, self.next_used)
        self._rec = rec

    def resume(self, rec: QueueRecord) -> tuple[list[tuple[int, int]], list[DescriptorChain]]:
        """Take the queue (activated on the same rings) over from a dead daemon's record.

        Returns the chains completed but not published, as (head, length) to `add_used`
        again, and the chains in flight, walked again, for the device to do again. Raises
        StaleRecord, or another VirtqueueError when the driver scribbled on a chain it lent.
        """
        self._check_generation()
        found: Recovered = recover_rings(rec, self.size, self._avail_buf, self._avail_off,
                                         self._used_buf, self._used_off)
        self.set_indices(found.next_avail, found.used_idx)
        self._signalled_valid = False  # the first publish after a restart interrupts
        chains = [self._walk(head) for head in found.in_flight]
        for chain in chains:
            chain.generation = self.generation
            self._in_flight[chain.head] = 1
        for head, _length in found.done:
            self._in_flight[head] = 1
        self._rec = rec
        return found.done, chains

    # -- the recorded steps ------------------------------------------------------------------------
    def pop(self) -> DescriptorChain | None:
        chain = super().pop()
        rec = self._rec
        if chain is not None and rec is not None:
            rec.entries[chain.head] = IN_FLIGHT  # before the device acts on it
        return chain

    def pop_tables(self, limit: int) -> list[Table]:
        popped = super().pop_tables(limit)
        rec = self._rec
        if rec is not None:
            entries = rec.entries
            for head, _table in popped:
                entries[head] = IN_FLIGHT  # before the device acts on them
        return popped

    def undo_pop(self, chain: DescriptorChain) -> None:
        current = chain.generation == self.generation
        super().undo_pop(chain)
        rec = self._rec
        if rec is not None and current:
            rec.freed(chain.head, self.next_avail)

    def add_used(self, head: int, length: int, generation: int | None = None) -> bool:
        added = super().add_used(head, length, generation)
        rec = self._rec
        if added and rec is not None:
            rec.done(head, length)
        return added

    def add_used_run(self, elems: list[int]) -> None:
        super().add_used_run(elems)
        rec = self._rec
        if rec is not None:
            for i in range(0, len(elems), 2):
                rec.done(elems[i], elems[i + 1])

    def publish_used(self) -> bool:
        rec = self._rec
        if rec is None or not self.ready:
            return super().publish_used()
        new = self.next_used
        rec.before_publish(self.next_avail, new)
        wanted = super().publish_used()
        rec.after_publish(new)
        return wanted
