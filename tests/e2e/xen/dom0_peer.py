"""dom0's side of the guest's workloads, run for the whole test by dom0-full.sh.

- console: connects (and reconnects: each vmmiod instance makes its sockets anew) to every
  console socket backend given; logs what arrives; answers each line "E2E-PING <token> <tag>"
  with "E2E-PONG <token> <tag>".
- net: TCP 5001 receives until EOF and records byte count and sha256 (the guest's upload);
  TCP 5002 reads a decimal byte count line, sends that much of the file given with --send
  (the guest's download) and closes.
Findings are appended to --out as "key=value" lines; test_xen_e2e.py reads them.
Bounded: exits after --lifetime seconds at the latest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import threading
import time

UP_PORT = 5001
DOWN_PORT = 5002


class Findings:
    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def add(self, line: str) -> None:
        with self.lock, open(self.path, "a") as f:
            f.write(line + "\n")


def console_client(path: str, name: str, token: str, out: Findings, stop: threading.Event) -> None:
    connections = 0
    while not stop.is_set():
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
        except OSError:
            time.sleep(0.2)
            continue
        connections += 1
        out.add(f"console_connected port={name} n={connections}")
        s.settimeout(0.5)
        buf = b""
        with open(f"/out/console-{name}.txt", "ab") as raw:
            while not stop.is_set():
                try:
                    data = s.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                raw.write(data)
                raw.flush()
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace").strip()
                    words = text.split()
                    if len(words) == 3 and words[0] == "E2E-PING" and words[1] == token:
                        s.sendall(f"E2E-PONG {token} {words[2]}\n".encode())
                        out.add(f"console_ping port={name} tag={words[2]}")
        s.close()
        out.add(f"console_disconnected port={name} n={connections}")


def serve_up(srv: socket.socket, out: Findings) -> None:
    n = 0
    while True:
        conn, _ = srv.accept()
        n += 1
        h, size = hashlib.sha256(), 0
        conn.settimeout(120)
        try:
            while data := conn.recv(65536):
                h.update(data)
                size += len(data)
        except OSError as exc:
            out.add(f"net_up_error n={n} error={exc!r}".replace(" ", "_"))
        conn.close()
        out.add(f"net_up n={n} bytes={size} sha256={h.hexdigest()}")


def serve_down(srv: socket.socket, blob: bytes, out: Findings) -> None:
    """Send the first N bytes of the test file, N being the decimal first line the client sends."""
    n = 0
    while True:
        conn, _ = srv.accept()
        n += 1
        conn.settimeout(120)
        try:
            request = b""
            while b"\n" not in request and len(request) < 32:
                data = conn.recv(32)
                if not data:
                    break
                request += data
            size = min(int(request.split(b"\n")[0] or 0), len(blob))
            conn.sendall(blob[:size])
            out.add(f"net_down n={n} bytes={size}")
        except (OSError, ValueError) as exc:
            out.add(f"net_down_error n={n} error={exc!r}".replace(" ", "_"))
        conn.close()


def listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4)
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--token", required=True)
    ap.add_argument("--console", action="append", default=[], help="NAME=SOCKET_PATH")
    ap.add_argument("--send", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lifetime", type=float, default=600)
    args = ap.parse_args()
    out = Findings(args.out)
    stop = threading.Event()
    with open(args.send, "rb") as f:
        blob = f.read()
    threads = [threading.Thread(target=serve_up, args=(listener(UP_PORT), out), daemon=True),
               threading.Thread(target=serve_down, args=(listener(DOWN_PORT), blob, out),
                                daemon=True)]
    for spec in args.console:
        name, _, path = spec.partition("=")
        threads.append(threading.Thread(target=console_client,
                                        args=(path, name, args.token, out, stop), daemon=True))
    for t in threads:
        t.start()
    out.add(f"peer_started pid={os.getpid()}")
    time.sleep(args.lifetime)
    stop.set()


if __name__ == "__main__":
    main()
