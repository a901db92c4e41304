"""The hostile-guest fuzzing campaign: at least 100,000 moves through the full stack in CI.

`VMMIOD_FUZZ_EXAMPLES=N` sets the number of moves (default 100,000: a couple of minutes);
the longer run is `VMMIOD_FUZZ_EXAMPLES=2000000 .venv/bin/python -m pytest -s
tests/hardening/test_fuzz.py`. The first round is derandomized (reproducible in CI); further
rounds draw fresh seeds, and any failure prints the `@reproduce_failure` blob to replay it.
"""

from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.hardening.checks import METER, STATS
from tests.hardening.fuzz_machine import HostileGuest
from tests.hardening.stack import fd_count, map_count

TARGET = int(os.environ.get("VMMIOD_FUZZ_EXAMPLES", "100000"))
STEPS_PER_RUN = 60
RUNS_PER_ROUND = 400


def test_hostile_guest_campaign() -> None:
    fds, maps = fd_count(), map_count()
    t0 = time.perf_counter()
    rounds = 0
    with METER.installed():
        while STATS.steps < TARGET:
            run_state_machine_as_test(HostileGuest, settings=settings(
                max_examples=RUNS_PER_ROUND, stateful_step_count=STEPS_PER_RUN, deadline=None,
                derandomize=rounds == 0, database=None, print_blob=True,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck)))
            rounds += 1
    elapsed = time.perf_counter() - t0
    print(f"\nhostile-guest campaign: {STATS.steps} moves in {STATS.runs} runs ({rounds} rounds) "
          f"in {elapsed:.1f} s")
    print(f"  violations logged {STATS.violations}, windows put in NEEDS_RESET "
          f"{STATS.needs_reset}, queue errors {STATS.queue_errors}, failed requests "
          f"{STATS.failed_requests}, accesses refused by guest memory {STATS.rejected}")
    print(f"  audited memory lookups {STATS.audited}, descriptors read {STATS.descriptors_read},"
          f" longest walk {STATS.max_walk}, most chains popped in one move {STATS.max_pops}, "
          f"recoveries {STATS.recoveries}")
    print(f"  in flight across moves: completions parked {STATS.parked}, delivered late "
          f"{STATS.late_delivered}, stale completions dropped {STATS.stale_dropped}, buffers "
          f"taken back by a reset while held {STATS.reclaimed}")
    print(f"  moves by rule: {dict(sorted(STATS.rules.items()))}")
    print(f"  error-level events: {STATS.error_events}")
    print(f"  fds {fds} -> {fd_count()}, mappings {maps} -> {map_count()}")
    assert STATS.steps >= TARGET
    assert STATS.violations and STATS.rejected and STATS.recoveries  # the campaign bit
    # ... and interleaved: late completions met resets of what they belonged to
    assert STATS.late_delivered and STATS.reclaimed and STATS.stale_dropped
    assert fd_count() <= fds + 2  # hypothesis may keep a file or two; devices keep none
