"""Console clients that connect and vanish in the middle of the guest's output, 1,000 times.

The guest writes without pause (4 KiB chunks, a running counter) while another thread plays
1,000 clients on the console's Unix socket: each reads some of the output, maybe types a few
bytes, and goes away: a plain close with unread output pending, a half-close first, or right
after sending input. The guest's writes stall while a client is attached and not reading, so
most clients vanish in the middle of a write. Afterwards a well-behaved client must get the
guest's next line; the device must not have failed, fds are counted in this process.
"""

from __future__ import annotations

import gc
import os
import random
import socket
import threading
import time
from pathlib import Path

from tests.hardening.inproc_guest import CON_BASE, InprocGuest
from tests.hardening.stack import fd_count
from vmmiod.sim.console import ConsoleDriver

CLIENTS = int(os.environ.get("VMMIOD_CONSOLE_CLIENTS", "1000"))
CHUNK = 4096


def _client_storm(path: str, n: int, stats: dict[str, int], done: threading.Event) -> None:
    rng = random.Random(7)
    try:
        for _ in range(n):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(2.0)
            while True:
                try:
                    c.connect(path)
                    break
                except BlockingIOError:  # the listen backlog is full: the daemon is busy
                    stats["backlog_full"] += 1
                    time.sleep(0.001)
            want = rng.choice((0, 1, 100, 4096, 65536))
            got = 0
            try:
                while got < want:
                    chunk = c.recv(min(65536, want - got))
                    if not chunk:
                        stats["eof"] += 1
                        break
                    if b"already has a client" in chunk:
                        stats["refused"] += 1
                        break
                    got += len(chunk)
            except TimeoutError:
                stats["timeouts"] += 1
            stats["bytes"] += got
            how = rng.choice(("close", "half", "type"))
            try:
                if how == "half":
                    c.shutdown(socket.SHUT_WR)
                elif how == "type":
                    c.send(b"typed while leaving\n")
            except OSError:
                pass
            c.close()
            stats[how] += 1
    finally:
        done.set()


def test_console_clients_vanish_mid_write_1000_times(tmp_path: Path) -> None:
    stats = {"bytes": 0, "eof": 0, "refused": 0, "timeouts": 0, "close": 0, "half": 0,
             "type": 0, "backlog_full": 0}
    with InprocGuest(tmp_path, block=False, net=False) as g:
        con = ConsoleDriver(g.vmm, g.window(CON_BASE), queue_size=16)
        con.start()
        gc.collect()
        fds = fd_count()
        done = threading.Event()
        storm = threading.Thread(target=_client_storm,
                                 args=(str(g.console_path), CLIENTS, stats, done))
        t0 = time.perf_counter()
        storm.start()
        seq = written = typed = 0
        while not done.is_set():
            line = f"{seq:012d}\n".encode() * (CHUNK // 13)
            con.write(line)
            written += len(line)
            seq += 1
            typed += len(con.poll_rx())
        storm.join()
        elapsed = time.perf_counter() - t0
        con.flush()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as last:
            last.settimeout(10)
            last.connect(str(g.console_path))
            time.sleep(0.05)
            con.write(b"FINAL-MARKER\n")
            seen = b""
            while b"FINAL-MARKER\n" not in seen:
                chunk = last.recv(65536)
                assert chunk, "the console closed the last client"
                seen = seen[-64:] + chunk
        time.sleep(0.6)  # the hang-up of the last client is noticed on a tick
        gc.collect()
        fds_after = fd_count()
        counters, failed = g.daemon.call(
            lambda: (dict(g.devices["con0"].counters), g.devices["con0"].failed))
        errors = g.errors()
    print(f"\nconsole churn: {CLIENTS} clients in {elapsed:.1f} s while the guest wrote "
          f"{written} bytes; clients read {stats['bytes']} bytes; the guest read {typed} "
          f"typed bytes")
    print(f"  endings: {stats['close']} close, {stats['half']} half-close, {stats['type']} "
          f"typed-then-closed; refused {stats['refused']}, read timeouts {stats['timeouts']}, "
          f"connects retried on a full listen backlog {stats['backlog_full']}")
    print(f"  device: {counters['client_connects']} connects, "
          f"{counters.get('port0_dropped_bytes', 0)} bytes dropped from the full ring; "
          f"fds {fds} -> {fds_after}")
    assert not failed and not errors, errors[:5]
    assert counters["client_connects"] == CLIENTS + 1
    assert stats["refused"] == 0  # a vanished client never blocks the next one
    assert fds_after <= fds
