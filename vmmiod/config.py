"""Guest configuration: one YAML file per guest, parsed into frozen dataclasses.

The rest of vmmiod sees only the dataclasses (defined in vmmiod/configmodel.py, re-exported
here) and `load()`. Parsing checks everything and reports every problem found with file, line
and key path; see docs/configuration.md. The readers (configreader.py: YAML nodes and value
types; configschema.py: per-section checks) import the model, never this module, so the
configuration modules have no import cycle.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from vmmiod.configmodel import (
    GENERIC_RUN_DIR,
    GENERIC_SOCKET_NAME,
    MMIO_WINDOW_SIZE,
    NO_WINDOW,
    BlockConfig,
    Config,
    ConsoleBackend,
    ConsoleConfig,
    ConsolePortConfig,
    DeviceConfig,
    DgramBackend,
    FileBackend,
    GenericConfig,
    GuestConfig,
    HypervisorConfig,
    LogConfig,
    MmioConfig,
    NetBackend,
    NetConfig,
    PtyBackend,
    SocketAddress,
    SocketBackend,
    TapBackend,
    VhostUserConfig,
    VhostUserSocket,
    XenConfig,
)
from vmmiod.configreader import Reader
from vmmiod.configschema import Schema

__all__ = [
    "EX_CONFIG",
    "GENERIC_RUN_DIR",
    "GENERIC_SOCKET_NAME",
    "MMIO_WINDOW_SIZE",
    "NO_WINDOW",
    "BlockConfig",
    "Config",
    "ConfigError",
    "ConsoleBackend",
    "ConsoleConfig",
    "ConsolePortConfig",
    "DeviceConfig",
    "DgramBackend",
    "FileBackend",
    "GenericConfig",
    "GuestConfig",
    "HypervisorConfig",
    "LogConfig",
    "MmioConfig",
    "NetBackend",
    "NetConfig",
    "PtyBackend",
    "SocketAddress",
    "SocketBackend",
    "TapBackend",
    "VhostUserConfig",
    "VhostUserSocket",
    "XenConfig",
    "load",
    "load_text",
]

EX_CONFIG = 78


class ConfigError(Exception):
    """The configuration is invalid. `problems`: one "file:line: key.path: message" each."""

    exit_code = EX_CONFIG

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def load(path: str | os.PathLike[str], *, check_files: bool = True) -> Config:
    """Read and check one guest's YAML file. Raises ConfigError listing every problem found.

    Relative paths in the file are relative to the file's folder. `check_files=False` skips
    the checks that look at the host (backing files exist and are accessible).
    """
    label = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{label}:0: (file): cannot read it: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{label}:0: (file): not UTF-8 text: {exc.reason}"]) from None
    return load_text(text, label, base_dir=Path(path).absolute().parent, check_files=check_files)


def load_text(text: str, label: str = "<config>", *, base_dir: Path | None = None,
              check_files: bool = True) -> Config:
    """Like `load()` for text already read; `label` names it in messages."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        detail = f"{exc.problem}" + (f" ({exc.context})" if exc.context else "")
        raise ConfigError([f"{label}:{line}: (yaml): {detail}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{label}:1: (yaml): {exc}"]) from None
    finally:
        loader.dispose()
    reader = Reader(label, base_dir or Path.cwd(), loader)
    config = Schema(reader, check_files).config(root, Path(label))
    if reader.problems or config is None:
        raise ConfigError(reader.messages())
    return config
