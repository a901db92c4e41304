"""A private apt configuration for another Debian suite and architecture (arm64 by default).

The archive URIs are read at run time from the host's own apt sources (deb822 `.sources` files,
then the one-line `sources.list`), so the project never names a package registry host. Nothing
touches the host's apt state: lists, caches, the (empty) dpkg status and the downloaded files all
live under the cache directory given by the caller.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
STEP_TIMEOUT = 1200  # seconds for one apt command (a download of a few hundred MB at worst)


@dataclass(frozen=True)
class HostSource:
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None


def _parse_deb822(text: str) -> list[HostSource]:
    out: list[HostSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            if ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        out.append(
            HostSource(
                uris=tuple(fields.get("uris", "").split()),
                suites=tuple(fields.get("suites", "").split()),
                components=tuple(fields.get("components", "").split()),
                signed_by=fields.get("signed-by") or None,
            )
        )
    return out


def _parse_one_line(text: str) -> list[HostSource]:
    out: list[HostSource] = []
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()  # type: ignore[assignment]
        if len(line) >= 3 and line[0] == "deb":
            out.append(HostSource((line[1],), (line[2],), tuple(line[3:]), None))
    return out


def host_sources(etc: str = "/etc/apt") -> list[HostSource]:
    found: list[HostSource] = []
    for path in sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.sources"))):
        found += _parse_deb822(Path(path).read_text(errors="replace"))
    for path in [os.path.join(etc, "sources.list")] + sorted(
        glob.glob(os.path.join(etc, "sources.list.d", "*.list"))
    ):
        if os.path.exists(path):
            found += _parse_one_line(Path(path).read_text(errors="replace"))
    return found


def archive_uris(sources: list[HostSource]) -> tuple[str, str | None, str]:
    """(main archive URI, security archive URI or None, keyring) from the host's apt sources."""
    main = security = None
    keyring = DEFAULT_KEYRING
    for src in sources:
        if not src.uris or "main" not in src.components:
            continue
        if any(s.endswith(("-security", "/updates")) for s in src.suites):
            security = security or src.uris[0]
        else:
            if main is None and src.signed_by and os.path.exists(src.signed_by):
                keyring = src.signed_by
            main = main or src.uris[0]
    if main is None:
        raise SystemExit(
            "e2e: no Debian archive with component 'main' found in /etc/apt/sources.list.d/*.sources"
            " or /etc/apt/sources.list; the harness reads the archive URI from there"
        )
    return main.rstrip("/"), security.rstrip("/") if security else None, keyring


class PrivateApt:
    """apt-get / apt-cache against a private state directory for `suite` on `arch`."""

    def __init__(self, root: Path, suite: str, arch: str = "arm64") -> None:
        self.root = root
        self.suite = suite
        self.arch = arch
        self.lists = root / "lists"
        self.cache = root / "cache"
        self.status = root / "status"
        self.sources = root / "sources.list"

    def configure(self) -> None:
        main, security, keyring = archive_uris(host_sources())
        opts = f"[arch={self.arch} signed-by={keyring}]"
        lines = [
            f"deb {opts} {main} {self.suite} main",
            f"deb {opts} {main} {self.suite}-updates main",
            f"deb-src [signed-by={keyring}] {main} {self.suite} main",
        ]
        if security:
            lines.append(f"deb {opts} {security} {self.suite}-security main")
        for d in (self.lists / "partial", self.cache / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        if not self.status.exists():
            self.status.write_text("")  # nothing "installed": resolve the full closure
        text = "\n".join(lines) + "\n"
        if not self.sources.exists() or self.sources.read_text() != text:
            self.sources.write_text(text)

    def options(self) -> list[str]:
        return [
            f"-oDir::Etc::SourceList={self.sources}",
            "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={self.lists}",
            f"-oDir::State::status={self.status}",
            f"-oDir::Cache={self.cache}",
            f"-oAPT::Architecture={self.arch}",
            f"-oAPT::Architectures={self.arch}",
            "-oAPT::Install-Recommends=false",
            "-oAPT::Install-Suggests=false",
            "-oDebug::NoLocking=true",
            "-oAPT::Sandbox::User=root",
            "-oAcquire::Retries=3",
            "-qq",
        ]

    def run(self, tool: str, *args: str, cwd: Path | None = None, capture: bool = False) -> str:
        cmd = [tool, *self.options(), *args]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        res = subprocess.run(
            cmd, cwd=cwd, env=env, text=True, check=False, timeout=STEP_TIMEOUT,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
        )
        if res.returncode != 0:
            err = (res.stderr or "")[-3000:] if capture else ""
            raise SystemExit(f"e2e: {' '.join(cmd[:1] + list(args))} failed ({res.returncode})\n{err}")
        return res.stdout or ""

    def update(self) -> None:
        self.run("apt-get", "update")

    def resolve(self, packages: list[str]) -> list[tuple[str, str]]:
        """(package, version) of every package `apt-get install` would bring in."""
        out = self.run("apt-get", "-s", "install", *packages, capture=True)
        found = re.findall(r"^Inst (\S+) \((\S+)", out, re.MULTILINE)
        return [(name.split(":")[0], ver) for name, ver in found]

    def download(self, packages: list[str]) -> None:
        """Download `packages` and their dependency closure into the archive cache."""
        self.run("apt-get", "-y", "--download-only", "install", *packages)

    def archives(self) -> Path:
        return self.cache / "archives"

    def depends(self, package: str) -> list[str]:
        out = self.run("apt-cache", "depends", "--no-recommends", "--no-suggests", package,
                       capture=True)
        return re.findall(r"^\s+Depends: (\S+)", out, re.MULTILINE)

    def source(self, package: str, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self.run("apt-get", "source", "--download-only", package, cwd=dest)
