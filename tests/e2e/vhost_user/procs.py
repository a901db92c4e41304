"""The processes of a vhost-user e2e run (backends, testpmd, the mirror's peer): started in the
run's network namespace, logging to a file, with their CPU time read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
START_WAIT = 120  # seconds for a backend's sockets to appear (Python under a loaded host)
STOP_WAIT = 15


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of the whole process (every thread), in clock ticks; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted from 1


class Proc:
    """One backend process, started in the run's network namespace, logging to a file."""

    def __init__(self, name: str, cmd: list[str], log: Path, sockets: list[Path],
                 cwd: Path | None = None, env: dict[str, str] | None = None,
                 stdin_pipe: bool = False) -> None:
        self.name, self.cmd, self.log, self.sockets, self.cwd = name, cmd, log, sockets, cwd
        self.env, self.stdin_pipe = env, stdin_pipe  # a pipe: the process ends when it closes
        self.popen: subprocess.Popen[bytes] | None = None
        self.expected_exit = False
        self.history: list[dict[str, Any]] = []

    def start(self, log: Path | None = None, wait_sockets: bool = True) -> None:
        self.log = log or self.log
        if wait_sockets:
            for s in self.sockets:
                s.unlink(missing_ok=True)
        with open(self.log, "ab") as f:
            self.popen = subprocess.Popen(
                self.cmd, stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
                stdout=f, stderr=f, cwd=self.cwd, env=self.env, start_new_session=True)
        self.expected_exit = False
        self.history.append({"pid": self.popen.pid, "log": self.log.name,
                             "started": time.monotonic()})
        if not wait_sockets:
            return
        deadline = time.monotonic() + START_WAIT
        while not all(s.exists() for s in self.sockets):
            if self.popen.poll() is not None:
                raise SystemExit(f"vu-e2e: {self.name} exited ({self.popen.returncode}) before "
                                 f"serving; see {self.log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"vu-e2e: {self.name} made no socket in {START_WAIT}s")
            time.sleep(0.2)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def died(self) -> int | None:
        """Exit status when the process ended without being asked to."""
        if self.popen is None or self.expected_exit:
            return None
        return self.popen.poll()

    def kill9(self) -> None:
        assert self.popen is not None
        self.expected_exit = True
        self.popen.send_signal(signal.SIGKILL)
        rc = self.popen.wait(timeout=STOP_WAIT)
        self.history[-1].update(ended=time.monotonic(), rc=rc, how="SIGKILL")

    def stop(self) -> None:
        if self.popen is None or "rc" in self.history[-1]:
            return
        self.expected_exit = True
        unasked = self.popen.poll()
        if unasked is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            rc = self.popen.wait(timeout=STOP_WAIT)
            how = "exited by itself" if unasked is not None else "SIGTERM"
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            rc = self.popen.wait()
            how = f"SIGKILL after SIGTERM was ignored for {STOP_WAIT}s"
        self.history[-1].update(ended=time.monotonic(), rc=rc, how=how)
