"""The `vmmiod` command: run, dom0, check, demo, bench.

`run`, `dom0` and `check` are here (`dom0` hands over to vmmiod.dom0); `demo` and `bench` hand their arguments, untouched, to their own
modules (vmmiod.demo, vmmiod.bench), which parse them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from vmmiod import __version__
from vmmiod.config import MMIO_WINDOW_SIZE, Config, ConfigError, load

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
DELEGATES = ("demo", "bench")
GLOBAL_VALUE_OPTIONS = ("--log-format", "--log-level")


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the subcommand (`vmmiod --log-level debug run X`)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--log-format", choices=("json", "console"), default=default,
                        help="log rendering (default: the config's log.format, else console on "
                             "a terminal and JSON otherwise)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default=default, help="log level (default: the config's log.level)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmmiod", description="virtio device backends (block, net, console): virtio-mmio "
                                   "for Xen guests and for any VMM speaking the generic IOREQ "
                                   "channel, and vhost-user for QEMU and other VMMs.")
    parser.add_argument("--version", action="version", version=f"vmmiod {__version__}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="serve one guest's devices in the foreground (what "
                                     "systemd starts)",
                         description="Serve the devices of one guest until SIGTERM/SIGINT or "
                                     "until the guest goes away.")
    _common(run, suppress=True)
    run.add_argument("config", type=Path, help="the guest's YAML file")
    dom0 = sub.add_parser("dom0", help="the Xen dom0 service: serve every guest the "
                                       "toolstack gives virtio devices (what systemd starts)",
                          description="Watch xenstore for the virtio backend entries xl writes "
                                      "and serve each new guest with its own instance and "
                                      "<config dir>/<domain name>.yaml, until SIGTERM/SIGINT.")
    _common(dom0, suppress=True)
    dom0.add_argument("--config-dir", type=Path, default=Path("/etc/vmmiod"),
                      help="where the guests' YAML files are (default: /etc/vmmiod)")
    dom0.add_argument("--backend-domid", type=int, default=None,
                      help="the domain whose backend entries to follow (default: this one)")
    check = sub.add_parser("check", help="validate a config and print what would be served",
                           description="Validate a guest's YAML and print the devices, windows, "
                                       "IRQs and backends it would serve, touching nothing. "
                                       "Exit 0 when valid, 78 (EX_CONFIG) otherwise.")
    _common(check, suppress=True)
    check.add_argument("config", type=Path, help="the guest's YAML file")
    check.add_argument("--json", action="store_true", help="print the parsed config as JSON")
    check.add_argument("--no-files", action="store_true",
                       help="skip the checks that look at this host (backing files), e.g. to "
                            "validate a config on another machine")
    sub.add_parser("demo", add_help=False, help="run a simulated guest against a daemon "
                                                "(vmmiod demo --help)")
    sub.add_parser("bench", add_help=False, help="print benchmark figures (vmmiod bench --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    split = _delegate_split(args_list)
    if split is not None:
        return _delegate(*split)
    args = build_parser().parse_args(args_list)
    if args.command == "check":
        return check(args.config, as_json=args.json, check_files=not args.no_files)
    if args.command == "dom0":
        from vmmiod import dom0

        return dom0.main(args.config_dir, backend_domid=args.backend_domid,
                         log_format=args.log_format, log_level=args.log_level)
    return run(args.config, log_format=args.log_format, log_level=args.log_level)


# -- check ----------------------------------------------------------------------------------------
def check(path: Path, *, as_json: bool = False, check_files: bool = True) -> int:
    try:
        config = load(path, check_files=check_files)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        n = len(exc.problems)
        print(f"{path}: {n} problem{'s' if n != 1 else ''}; nothing would be served",
              file=sys.stderr)
        return exc.exit_code
    _print(json.dumps(_plain(config), indent=2) if as_json else describe(config))
    return EX_OK


def _print(text: str) -> None:
    """Print, to a reader that may have gone (`vmmiod check --json F | head`): no traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's last flush goes there
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def describe(config: Config) -> str:
    """What `check` prints: the guest, the adaptor, and one line per device."""
    g, h = config.guest, config.hypervisor
    domid = "auto" if g.domid is None else str(g.domid)
    if h.kind == "xen":
        hyp = (f"xen (interrupts {h.interrupts}, grants {h.grants}, map cache "
               f"{h.map_cache_pages} pages)")
    elif h.kind == "generic":
        hyp = f"generic (socket {h.socket}, on disconnect {h.on_disconnect})"
    else:
        hyp = f"vhost-user (one socket per device, reconnect every {h.reconnect:g} s)"
    log = config.log
    lines = [f"{config.path}: OK",
             f"guest       {g.name} (domid {domid})",
             f"hypervisor  {hyp}",
             f"log         {log.level}, format {log.format}, counters every "
             f"{log.stats_interval:g} s" + (f", to {log.file}" if log.file else ""),
             f"devices     {len(config.devices)}"]
    for dev in config.devices:
        m = dev.mmio
        if dev.vhost_user is not None:
            ep = dev.vhost_user
            how = "connects to" if ep.connect else "listens on"
            cfg = "" if ep.offers_config(dev.type) else ", config space left to the VMM"
            lines.append(f"  {dev.id:<10} {dev.type:<8} vhost-user, {how} {ep.path}{cfg}")
            lines.append(f"  {'':<10} {'':<8} {_backend(dev)}")
            continue
        if m.auto:
            where = "window auto (from xenstore)"
        else:
            assert m.base is not None
            where = f"window {m.base:#010x}-{m.base + MMIO_WINDOW_SIZE - 1:#010x} irq {m.irq}"
        lines.append(f"  {dev.id:<10} {dev.type:<8} {where}  virtio-mmio v{m.version}")
        lines.append(f"  {'':<10} {'':<8} {_backend(dev)}")
    if h.kind == "xen":
        from vmmiod.xlconfig import xl_lines

        lines += xl_lines(config)
    return "\n".join(lines)


def _backend(dev: Any) -> str:
    if dev.type == "block":
        mode = "read-only" if dev.readonly else "read-write"
        return (f"image {dev.path} ({mode}, cache {dev.cache}, {dev.queues} queue(s) of "
                f"{dev.queue_size})")
    if dev.type == "net":
        b = dev.backend
        mac = dev.mac or "auto"
        if b.kind == "tap":
            tap = f"tap {b.ifname or 'auto'}" + (f" on bridge {b.bridge}" if b.bridge else "")
            return f"{tap}{'' if b.create else ' (existing)'}, mac {mac}, mtu {dev.mtu}"
        remote = str(b.remote) if b.remote else "learned"
        return f"dgram {b.local} -> {remote}, mac {mac}, mtu {dev.mtu}"
    ports = []
    for p in dev.ports:
        b = p.backend
        where = {"pty": f"pty{' -> ' + str(b.link) if getattr(b, 'link', None) else ''}",
                 "socket": f"socket {getattr(b, 'path', '')}",
                 "file": f"file {getattr(b, 'path', '')}"}[b.kind]
        ports.append(f"{p.name}: {where}")
    return "ports " + "; ".join(ports) + (" (multiport)" if dev.multiport else "")


def _plain(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _plain(asdict(obj))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# -- run ------------------------------------------------------------------------------------------
def run(path: Path, *, log_format: str | None, log_level: str | None) -> int:
    from vmmiod import daemon
    from vmmiod import log as logsetup

    try:
        config = load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{path}: invalid configuration; not starting", file=sys.stderr)
        return exc.exit_code
    try:
        logsetup.configure(log_level or config.log.level,
                           logsetup.resolve_format(log_format, config.log.format), config.log.file)
    except OSError as exc:
        print(f"{path}: cannot open log file {config.log.file}: {exc.strerror}", file=sys.stderr)
        return EX_UNAVAILABLE
    return daemon.run(config, level_from_cli=log_level is not None)


# -- demo, bench ----------------------------------------------------------------------------------
def _delegate_split(argv: list[str]) -> tuple[list[str], str, list[str]] | None:
    """(global options, command, the rest) when the command is demo or bench."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in DELEGATES:
            return argv[:i], arg, argv[i + 1:]
        if arg in GLOBAL_VALUE_OPTIONS:
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return None
    return None


def _delegate(global_args: list[str], command: str, rest: list[str]) -> int:
    from vmmiod import log as logsetup

    parser = argparse.ArgumentParser(prog="vmmiod", add_help=False)
    _common(parser, suppress=False)
    opts, unknown = parser.parse_known_args(global_args)
    if unknown:  # --help, --version or a typo before the command: the full parser answers
        build_parser().parse_args([*global_args, command])
        return EX_USAGE
    logsetup.configure(opts.log_level or "info", logsetup.resolve_format(opts.log_format))
    try:
        if command == "demo":
            from vmmiod.demo import main as entry
        else:
            from vmmiod.bench import main as entry
    except ImportError as exc:
        print(f"vmmiod {command} is not available in this installation: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    return int(entry(rest) or 0)
