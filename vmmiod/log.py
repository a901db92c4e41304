"""Structured logs: structlog set up for JSON lines (journald, files) or a console.

Only APIs present in structlog 22.3 (Debian 12) are used. The level can change at run time
(SIGHUP re-reads it from the config), so filtering is a processor that reads the current level
rather than a bound-logger class fixed at configuration time: loggers bound once at start-up
(guest, device) follow the change. Output goes through one `_Sink` whose stream can be reopened
(log rotation) without rebinding any logger.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO, Any

import structlog

LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50,
          "exception": 40, "fatal": 50, "msg": 20}
FORMATS = ("json", "console")
# Keys first in every JSON line, in this order; the rest follow as bound and given.
_LEAD = ("timestamp", "level", "event")


class _Sink:
    """Where rendered lines go: stderr, or a file reopened on SIGHUP."""

    def __init__(self) -> None:
        self.stream: IO[str] = sys.stderr
        self.path: Path | None = None
        self.lock = threading.Lock()

    def open(self, path: Path | None) -> None:
        with self.lock:
            old = self.stream
            self.path = path
            # The stream outlives this call (closed on the next reopen), so no `with`.
            self.stream = (open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
                           if path else sys.stderr)
            if old is not sys.stderr and old is not self.stream:
                old.close()

    def write(self, line: str) -> None:
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a full disk or closed stderr must not take the daemon down


class _State:
    level = LEVELS["info"]
    format = "console"
    console: Any = None


_sink = _Sink()
_state = _State()


class _Logger:
    """The structlog "logger" at the end of the chain: writes the rendered line to the sink."""

    def msg(self, message: str) -> None:
        _sink.write(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _logger_factory(*_args: Any) -> _Logger:
    return _Logger()


def _filter_level(_logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    if LEVELS.get(method, 20) < _state.level:
        raise structlog.DropEvent
    return event


def _lead_keys(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    ordered = {k: event.pop(k) for k in _LEAD if k in event}
    ordered.update(event)
    return ordered


def resolve_format(flag: str | None, configured: str = "auto",
                   stream: IO[str] | None = None) -> str:
    """The command line wins, then the config; "auto" is console on a terminal, JSON otherwise."""
    choice = flag or configured
    if choice in FORMATS:
        return choice
    stream = stream or sys.stderr
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def configure(level: str = "info", fmt: str = "console", file: Path | None = None) -> None:
    """Set up structlog (and route stdlib `logging`, e.g. asyncio's, into it).

    May be called again: loggers bound earlier follow the new level, format and file, because
    every choice is read from module state by the processors at each event.
    """
    _state.level = LEVELS[level]
    _sink.open(file)
    colors = file is None and _isatty(sys.stderr) and "NO_COLOR" not in os.environ
    _state.console = structlog.dev.ConsoleRenderer(colors=colors)
    _state.format = fmt
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _filter_level,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=_logger_factory,
        cache_logger_on_first_use=False,
    )
    _route_stdlib()


_format_exc_info = structlog.processors.format_exc_info
_json = structlog.processors.JSONRenderer(serializer=json.dumps, default=str)


def _render(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    if _state.format == "json":
        return _json(logger, method, _lead_keys(logger, method,
                                                 _format_exc_info(logger, method, event)))
    return _state.console(logger, method, event)


def set_level(level: str) -> None:
    _state.level = LEVELS[level]


def current_level() -> str:
    return next(k for k, v in LEVELS.items() if v == _state.level)


def reopen() -> None:
    """SIGHUP: reopen the log file (after rotation); stderr needs nothing."""
    if _sink.path is not None:
        _sink.open(_sink.path)


def get_logger(**context: Any) -> Any:
    return structlog.get_logger().bind(**context)


class _StdlibBridge(logging.Handler):
    """Library messages (asyncio's "Task exception was never retrieved") as `library_log`."""

    def emit(self, record: logging.LogRecord) -> None:
        method = record.levelname.lower()
        if method not in LEVELS:
            method = "info"
        log = structlog.get_logger()
        extra: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            extra["exc_info"] = record.exc_info
        getattr(log, method)("library_log", **extra)


def _route_stdlib() -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _StdlibBridge):
            root.removeHandler(h)
    root.addHandler(_StdlibBridge())
    root.setLevel(logging.WARNING)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
