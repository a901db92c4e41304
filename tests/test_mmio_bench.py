"""The register benchmark runs, and every access it times really went through to the device."""

from __future__ import annotations

from vmmiod.bench import registers


def test_register_benchmark_measures_real_accesses() -> None:
    n = 300
    figures = registers.measure(n)
    # window, bus, slot and slot server loops each made n timed + n warm-up QueueNotify writes.
    assert figures["notifications seen by device"] == 4 * 2 * n
    for path in ("notify window", "notify bus", "notify slot", "notify slot server",
                 "config window", "config bus", "config slot", "config slot server",
                 "InterruptStatus eventfd loop (both sides, CPU)"):
        assert figures[path]["accesses_per_s"] > 0
    assert figures["notify slot/window time ratio"] > 0
