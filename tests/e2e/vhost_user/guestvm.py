"""The QEMU guest of a vhost-user e2e run: its command line, its console, and the watchdogs.

A backend that dies is silent to QEMU: QEMU keeps running and the guest's I/O never completes.
So the run watches for itself: a deadline, a silence limit on the console, and the backends'
liveness (a backend that exits unasked stops the run).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from backends import Stack

# PCI slots (QEMU addr=) of the guest's devices; guest.sh finds its disks by slot.
SLOTS = {"ext4": 0x04, "verify": 0x05, "bench-qsd": 0x06, "bench-vmmiod": 0x07, "net": 0x08,
         "share": 0x09, "mirror-testpmd": 0x0A, "mirror-vmmiod": 0x0B}
GRACE = 5  # seconds the console keeps being read after a backend died


def qemu_command(out: Path, results: Path, params: dict[str, Any], stack: Stack,
                 net: bool) -> list[str]:
    cmd = [
        "qemu-system-x86_64", "-machine", "q35,memory-backend=mem", "-accel", "tcg",
        "-smp", "1", "-m", "512M",
        # Named threads ("CPU 0/TCG" for the vCPU): the CPU placement finds the vCPU by it.
        "-name", "vu-e2e,debug-threads=on",
        # vhost-user backends map guest RAM: it must be a shareable fd.
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-monitor", "none", "-no-reboot",
        "-kernel", str(out / "vmlinuz"), "-initrd", str(out / "initramfs.cpio"),
        "-append", "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4",
    ]

    def blk(ident: str, sock: Path, slot: int) -> list[str]:
        return ["-chardev", f"socket,id=c-{ident},path={sock},reconnect=1",
                "-device", f"vhost-user-blk-pci,chardev=c-{ident},num-queues=1,addr={slot:#x}"]

    cmd += blk("ext4", stack.sock("dut-ext4"), SLOTS["ext4"])
    cmd += blk("verify", stack.sock("dut-verify"), SLOTS["verify"])
    cmd += blk("bench-qsd", stack.sock("qsd-bench"), SLOTS["bench-qsd"])
    if "vmmiod" in stack.bench:
        cmd += blk("bench-vmmiod", stack.sock("dut-bench"), SLOTS["bench-vmmiod"])
    if net:
        mac = params["NET_MAC"]
        if stack.dut_kind == "vmmiod":
            # vectors=0 (INTx): QEMU 7.2 segfaults under TCG when a vhost-user netdev starts
            # with MSI-X (msix_set_vector_notifiers from vhost_net_start).
            cmd += ["-chardev", f"socket,id=c-net,path={stack.sock('dut-net')},reconnect=1",
                    "-netdev", "vhost-user,id=n0,chardev=c-net",
                    "-device", (f"virtio-net-pci,netdev=n0,mac={mac},vectors=0,"
                                f"addr={SLOTS['net']:#x}")]
        else:  # the harness's own check: QEMU's TAP netdev on the same TAP
            cmd += ["-netdev", f"tap,id=n0,ifname={params['TAP_IF']},script=no,downscript=no",
                    "-device", f"virtio-net-pci,netdev=n0,mac={mac},addr={SLOTS['net']:#x}"]
    if stack.mirror:  # the net side by side: one NIC per mirroring back-end, same options
        for be, sock in (("testpmd", stack.sock("testpmd")), ("vmmiod", stack.sock("dut-mirror"))):
            mac = params[f"MIRROR_MAC_{be.upper()}"]
            cmd += ["-chardev", f"socket,id=c-m{be},path={sock},reconnect=1",
                    "-netdev", f"vhost-user,id=m{be},chardev=c-m{be}",
                    "-device", (f"virtio-net-pci,netdev=m{be},mac={mac},vectors=0,"
                                f"addr={SLOTS['mirror-' + be]:#x}")]
    cmd += ["-fsdev", f"local,id=out,path={results},security_model=none",
            "-device", f"virtio-9p-pci,fsdev=out,mount_tag=out,addr={SLOTS['share']:#x}"]
    wrapped: list[str] = stack.in_ns(cmd)
    return wrapped


# x86-64 machine code: rdtsc; shl rdx, 32; or rax, rdx; ret.
_RDTSC = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")


def host_tsc_khz(span: float = 0.2) -> int | None:
    """The host's TSC rate in kHz, measured against CLOCK_MONOTONIC over `span` seconds; None
    where it cannot be measured (not x86-64, executable memory refused).

    Under TCG a guest's RDTSC reads the host's TSC (QEMU's cpu_get_host_ticks), so this is the
    rate the guest's TSC runs at. microvm has no HPET and no PM timer: a kernel whose PIT
    calibration fails there (a busy host disturbs its timing loop) finds no TSC rate, prints
    `tsc: No reference (HPET/PMTIMER) available` and never leaves 0.000000 of its boot. Handing
    it the rate (`tsc_early_khz=`) takes that calibration out of the boot.
    """
    if os.uname().machine != "x86_64":
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, AttributeError):
        return None
    try:
        page.write(_RDTSC)
        buf = ctypes.c_char.from_buffer(page)
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(buf))
        t0, c0 = time.monotonic_ns(), rdtsc()
        time.sleep(span)
        t1, c1 = time.monotonic_ns(), rdtsc()
        del rdtsc, buf
    finally:
        page.close()
    khz = (c1 - c0) * 1_000_000 // max(t1 - t0, 1)
    return khz if 100_000 <= khz <= 10_000_000 else None


def microvm_command(out: Path, results: Path, params: dict[str, Any], stack: Stack,
                    net: bool) -> list[str]:
    """microvm (virtio-mmio, devices in the ACPI tables): one vhost-user-blk disk, the vhost-user
    NIC and the results share, all virtio-mmio devices. Its transports default to legacy (v1),
    which a vhost-user backend refuses: force-legacy=off. The console is the default ISA serial.
    """
    append = "console=ttyS0 rdinit=/init panic=-1 loglevel=6"
    if khz := host_tsc_khz():
        append += f" tsc_early_khz={khz}"
    cmd = [
        "qemu-system-x86_64", "-machine", "microvm,memory-backend=mem", "-accel", "tcg",
        "-smp", "1", "-m", "512M",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-global", "virtio-mmio.force-legacy=off",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-monitor", "none", "-no-reboot",
        # Not quiet: where a guest that stops in boot stopped (`tsc: No reference
        # (HPET/PMTIMER) available`) shows in console.log and in run.json's attempts.
        "-kernel", str(out / "vmlinuz"), "-initrd", str(out / "initramfs.cpio"),
        "-append", append,
        "-chardev", f"socket,id=c-verify,path={stack.sock('dut-verify')},reconnect=1",
        # queue-size=1024: QEMU's virtio-mmio offers QueueNumMax 1024 whatever the device's
        # queue-size, Linux takes it, and the inflight record QEMU sizes by queue-size must match.
        "-device", "vhost-user-blk,chardev=c-verify,num-queues=1,queue-size=1024",
    ]
    if net:
        cmd += ["-chardev", f"socket,id=c-net,path={stack.sock('dut-net')},reconnect=1",
                "-netdev", "vhost-user,id=n0,chardev=c-net",
                "-device", f"virtio-net-device,netdev=n0,mac={params['NET_MAC']}"]
    cmd += ["-fsdev", f"local,id=out,path={results},security_model=none",
            "-device", "virtio-9p-device,fsdev=out,mount_tag=out"]
    wrapped: list[str] = stack.in_ns(cmd)
    return wrapped


class Guest:
    def __init__(self, out: Path, results: Path, params: dict[str, Any], stack: Stack,
                 net: bool, machine: str = "q35") -> None:
        self.results, self.params, self.stack = results, params, stack
        make = microvm_command if machine == "microvm" else qemu_command
        self.cmd = make(out, results, params, stack, net)
        self.last_line = time.monotonic()
        self.done = False
        self.lines: list[dict[str, Any]] = []

    def _on_line(self, line: str, t: float) -> None:
        if "E2E-" not in line and "Kernel panic" not in line:
            return
        text = line[line.find("E2E-"):] if "E2E-" in line else line
        self.lines.append({"t": round(t, 2), "line": text})
        print(f"  [{t:6.1f}s] {text}", flush=True)
        if m := re.match(r"E2E-B (start|end) job=(\S+) be=(\S+) round=(\d+)", text):
            self.stack.bench_mark(m.group(1), m.group(2), m.group(3), int(m.group(4)))
        elif text.startswith("E2E-B begin"):
            self.stack.place()
        elif text.startswith("E2E-B over"):
            self.stack.unplace()
        elif text.startswith("E2E-N "):
            self.stack.net_line(text)
        elif text.startswith("E2E-K kill"):
            threading.Thread(target=self.stack.kill_and_restart, daemon=True).start()
        elif text.startswith("E2E-R done"):
            self.done = True

    def run(self, timeout: float, silence: float) -> tuple[str, float]:
        (self.results / "qemu-command.txt").write_text(" ".join(self.cmd) + "\n")
        start = time.monotonic()
        with open(self.results / "qemu.log", "wb") as err:
            proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, start_new_session=True)
        self.stack.qemu_pid = proc.pid  # `ip netns exec` execs QEMU: the same pid

        def pump() -> None:
            assert proc.stdout is not None
            with open(self.results / "console.log", "wb") as console:
                for raw in proc.stdout:
                    console.write(raw)
                    console.flush()
                    line = raw.decode(errors="replace").rstrip()
                    if "E2E-" in line:  # fio's progress lines go on while its I/O hangs
                        self.last_line = time.monotonic()
                    self._on_line(line, time.monotonic() - start)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        status = "running"
        died_at: float | None = None
        while proc.poll() is None:
            now = time.monotonic()
            if now - start > timeout:
                status = f"timeout: the guest did not finish in {timeout:.0f}s"
            elif now - self.last_line > silence:
                status = f"stuck: no result line from the guest for {silence:.0f}s"
            elif (why := self.stack.died()) and died_at is None:
                died_at, status = now, f"backend died: {why}"
            if status != "running" and (died_at is None or now - died_at > GRACE):
                break
            time.sleep(0.5)
        if proc.poll() is None:
            print(f"vu-e2e: {status}; stopping QEMU", flush=True)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=10)
        elapsed = time.monotonic() - start
        if status == "running":
            status = "ok" if self.done else f"guest stopped before finishing (QEMU exit {proc.returncode})"
        # Host-side times of the result lines and of the kill/restart, on one clock.
        events = [dict(e, t=round(e["t"] - start, 2)) for e in self.stack.events]
        (self.results / "timeline.json").write_text(json.dumps(
            {"qemu_rc": proc.returncode, "lines": self.lines, "host_events": events}, indent=1))
        return status, elapsed
