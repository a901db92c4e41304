"""`python -m vmmiod.sim --socket PATH`: the simulated guest against a daemon started elsewhere.

For a daemon run by systemd (`vmmiod@guest.service` with `hypervisor: {kind: generic}`): the sim
connects as the guest's VMM, probes every window the daemon announces and runs the workload of
each device it finds. Net needs `--net-peer udp:IP:PORT` (the address the daemon's dgram backend
sends to: we bind it), console needs `--console PATH` (its socket backend). Exit 0 when every
workload passed.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Sequence

from vmmiod.hypervisors.generic.protocol import IRQ_MODE_EVENTFD, IRQ_MODE_LEVEL
from vmmiod.sim.guest import run_guest
from vmmiod.sim.vmm import DEFAULT_RAM_GPA, SimError, SimVmm


def parse_peer(text: str) -> socket.socket:
    family, _, rest = text.partition(":")
    host, _, port = rest.rpartition(":")
    if family != "udp" or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write udp:IP:PORT")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host.strip("[]"), int(port)))
    return s


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmmiod.sim", description=__doc__.split("\n\n")[1])
    p.add_argument("--socket", required=True, help="the daemon's generic channel socket")
    p.add_argument("--console", help="the console device's socket backend path")
    p.add_argument("--net-peer", type=parse_peer, help="udp:IP:PORT the net backend sends to")
    p.add_argument("--image", help="the block device's backing file (compared after a flush)")
    p.add_argument("--ram", type=int, default=64, help="guest RAM in MiB (default 64)")
    p.add_argument("--ram-gpa", type=lambda t: int(t, 0), default=DEFAULT_RAM_GPA)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--level-irqs", action="store_true",
                   help="ask for level messages on the socket instead of interrupt eventfds")
    p.add_argument("--quick", action="store_true", help="smaller workloads")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))

    def say(kind: str, text: str) -> None:
        if not args.json:
            print(f"  [{kind:>7}] {text}", flush=True)

    mode = IRQ_MODE_LEVEL if args.level_irqs else IRQ_MODE_EVENTFD
    try:
        with SimVmm(ram_size=args.ram << 20, ram_gpa=args.ram_gpa, vcpus=args.vcpus,
                    irq_mode=mode, timeout=args.timeout) as vmm:
            server = vmm.connect(args.socket, wait=args.timeout)
            say("guest", f"connected: {len(server.windows)} windows")
            results = run_guest(vmm, image_path=args.image, console_path=args.console,
                                net_peer=args.net_peer, quick=args.quick, progress=say)
    except (SimError, OSError) as exc:
        print(f"vmmiod.sim: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.net_peer is not None:
            args.net_peer.close()
    ok = bool(results) and all(r["ok"] for r in results.values())
    if args.json:
        print(json.dumps({"ok": ok, "devices": results}, indent=2))
    else:
        print("passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
