"""The CI soak: 60 seconds of all three devices busy against a real daemon (the long run is
`python -m vmmiod.bench.soak --minutes 10`); RSS and fds flat, no error events, no data
mismatch, an orderly exit. `VMMIOD_SOAK_SECONDS` changes the length."""

from __future__ import annotations

import os

from vmmiod.bench.soak import soak

SECONDS = float(os.environ.get("VMMIOD_SOAK_SECONDS", "60"))
RSS_SLACK_KIB = 4096  # allocator noise; a leak of even 100 bytes a request is far above this


def test_soak_all_devices_busy_rss_and_fds_flat() -> None:
    f = soak(SECONDS, interval=max(1.0, SECONDS / 12))
    st, en, c = f["start"], f["end"], f["counts"]
    print(f"\nsoak {f['seconds']} s: block {c['block_requests']} requests "
          f"({c['block_bytes'] >> 20} MiB, {c['flushes']} flushes), net {c['frames']} frames, "
          f"console {c['console_bytes']} bytes")
    print(f"  daemon RSS {st['rss_kib']} -> {en['rss_kib']} KiB, anon {st['rss_anon_kib']} -> "
          f"{en['rss_anon_kib']} KiB, fds {st['fds']} -> {en['fds']} (at connect: "
          f"{f['at_connect']}); error events {f['error_events']}, warnings {f['warnings']}")
    print(f"  samples: {[(s['t'], s['rss_kib'], s['fds']) for s in f['samples']]}")
    assert f["error_events"] == 0, f["first_errors"]
    assert c["mismatches"] == 0
    assert f["daemon_exit"] == 0
    assert c["block_requests"] and c["frames"] and c["console_bytes"]
    assert en["fds"] == st["fds"]
    assert en["rss_kib"] - st["rss_kib"] <= RSS_SLACK_KIB
    assert en["rss_anon_kib"] - st["rss_anon_kib"] <= RSS_SLACK_KIB
