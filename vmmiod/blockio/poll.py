"""Bounded adaptive polling of a completion ring (the idea of QEMU's iothread poll-max-ns).

With one or two requests in flight, every completion costs a sleep in epoll and a wake-up (the
eventfd, the scheduler, on a VM often a halted vCPU woken by an interrupt) before any Python
runs, and that Python then runs cold. When the completion comes soon after the submission, it
is cheaper to look at the ring for a short while before going back to the loop's epoll.

`AdaptivePoll` only decides how long to look (sans-IO: it is given durations, never reads a
clock): the window starts at 0, grows (to GROW_START, then doubling) while completions come
within `max_ns` of the moment polling started but after the window, and halves (to 0 below
GROW_START) when they take longer than `max_ns`: a disk whose completions come later than the
bound is never polled for long. `max_ns` 0 turns polling off. The caller counts what the polls
cost (`spent_ns`, hits, misses): the CPU a poll burns is CPU the rest of the machine does not get.
"""

from __future__ import annotations

POLL_MAX_NS = 50_000  # the bound of one poll; docs/performance.md has the measurements
GROW_START = 4_000


class AdaptivePoll:
    """The poll window of one engine and what polling has cost."""

    __slots__ = ("hits", "max_ns", "misses", "spent_ns", "window")

    def __init__(self, max_ns: int = POLL_MAX_NS) -> None:
        self.max_ns = max(0, max_ns)
        self.window = 0
        self.hits = 0
        self.misses = 0
        self.spent_ns = 0

    def polled(self, spent_ns: int, hit: bool) -> None:
        """A poll that looked for `spent_ns` and found a completion (hit) or not."""
        self.spent_ns += spent_ns
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def waited(self, total_ns: int) -> None:
        """A completion came `total_ns` after the moment it could first have been polled for
        (the window included): adapt the window to it."""
        w = self.window
        if total_ns <= w:
            return  # found inside the window: keep it
        if total_ns > self.max_ns:  # too late for any allowed window: poll less
            w >>= 1
            self.window = w if w >= GROW_START else 0
        elif w < total_ns:  # would have been found with a larger window
            self.window = min(self.max_ns, max(GROW_START, w * 2))
