"""Debian's dpdk-testpmd, the reference vhost-user-net peer of the net side by side (docs/e2e.md).

Fetched, never installed: `apt-get download` (the host's apt, its configured archive) of the
package that ships /usr/bin/dpdk-testpmd (`dpdk-dev`), of the vhost PMD and of the ring mempool
driver (the two plugins testpmd needs here, named after dpdk-dev's own Depends), then of the
packages of every shared library the dynamic loader cannot find (`ldd` with LD_LIBRARY_PATH on
the tree extracted so far), level by level until nothing is missing; `dpkg-deb -x` into
`$VMMIOD_VU_CACHE/dpdk/root`. Libraries the host already has are taken from the host. Installing
dpdk-dev would pull 226 packages; this closure is about fifty.

testpmd then runs from that tree with LD_LIBRARY_PATH, and the two plugins are preloaded
(LD_PRELOAD): EAL refuses a plugin directory or file (`-d`) under a world-writable path such as
/tmp, and the cache may be there. Their constructors register the vhost vdev driver and the
`ring_mp_mc` mempool ops as a plugin load would.

A fetch that fails (no such package in the host's apt lists, a download error, a library no
package provides) leaves `dpdk/testpmd.json` with `status: missing` and the reason: the net side
by side is then skipped with that reason, and nothing else in the stage changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

PACKAGE = "dpdk-dev"  # ships /usr/bin/dpdk-testpmd (Debian 12: DPDK 22.11)
BINARY = "usr/bin/dpdk-testpmd"
PLUGINS = ("librte-net-vhost", "librte-mempool-ring")  # + DPDK's ABI (librte-eal<ABI>, a Depends)
VERSION = 1  # bump when the fetch changes in a way the stamp cannot see
MAX_LEVELS = 8
TIMEOUT = 600


def _apt_env() -> dict[str, str]:
    return dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")


def _run(cmd: list[str], cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env or _apt_env(), text=True, capture_output=True,
                          timeout=TIMEOUT, check=False)


def soname_package(soname: str) -> str:
    """Debian's name for the package of a shared library (policy 8.1): libfoo.so.3 -> libfoo3,
    libfoo2.so.1 -> libfoo2-1, lib_foo -> lib-foo. The few libraries named otherwise (zlib1g,
    libssl3) are on every host that runs this stage."""
    m = re.match(r"(.+?)\.so\.(.+)$", soname)
    if not m:
        return soname
    base = m.group(1).lower().replace("_", "-")
    return f"{base}{'-' if base[-1].isdigit() else ''}{m.group(2)}"


def candidate(package: str) -> str | None:
    res = _run(["apt-cache", "policy", package])
    m = re.search(r"Candidate: (\S+)", res.stdout)
    return None if not m or m.group(1) == "(none)" else m.group(1)


def candidates(packages: list[str]) -> dict[str, str | None]:
    """Candidate version of each package in the host's apt lists (None: none), in one call."""
    out: dict[str, str | None] = {p: None for p in packages}
    if not packages:
        return out
    current = None
    for line in _run(["apt-cache", "policy", *packages]).stdout.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current in out and (m := re.match(r"\s+Candidate: (\S+)", line)):
            out[current] = None if m.group(1) == "(none)" else m.group(1)
    return out


def lib_dirs(root: Path) -> list[Path]:
    """Every directory of the extracted tree that holds a shared library."""
    return sorted({p.parent for p in root.rglob("*.so*") if p.is_file()})


def plugin_paths(root: Path, sonames: list[str]) -> list[Path]:
    """The real files of the plugins (sonames), found anywhere in the tree."""
    out = []
    for soname in sonames:
        hits = sorted(p for p in root.rglob(soname) if p.exists())
        if hits:
            out.append(hits[0].resolve())
    return out


def not_found(root: Path, files: list[Path]) -> list[str]:
    """Sonames the loader cannot find for `files` with the tree's libraries on the path."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(map(str, lib_dirs(root))))
    res = _run(["ldd", *map(str, files)], env=env)
    return sorted(set(re.findall(r"^\s*(\S+) => not found", res.stdout, re.MULTILINE)))


class Fetch:
    """The closure of dpdk-testpmd under `top` (the stage's cache)."""

    def __init__(self, top: Path, log: Callable[[str], None] = print) -> None:
        self.dir = top / "dpdk"
        self.root = self.dir / "root"
        self.debs = self.dir / "debs"
        self.manifest = self.dir / "testpmd.json"
        self.log = log
        self.tried: set[str] = set()  # packages whose shlibs were looked at

    def cached(self, key: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return None
        if info.get("key") != key or info.get("status") != "ok":
            return None  # a failed fetch is tried again (it may have been the network)
        # The host's libraries are part of the closure: it must still load here.
        files = [self.root / BINARY, *map(Path, info.get("preload", []))]
        if all(f.exists() for f in files) and not not_found(self.root, files):
            return info
        return None

    def run(self, refresh: Callable[[], None] | None = None) -> dict[str, Any]:
        """Fetch (or take from the cache) and describe testpmd; never raises for a missing
        package: the result says `status: missing` and why."""
        version = candidate(PACKAGE)
        if version is None and refresh is not None:
            refresh()
            version = candidate(PACKAGE)
        key = f"{VERSION}:{PACKAGE}={version}"
        if (info := self.cached(key)) is not None:
            return info
        if version is None:
            info = {"status": "missing", "key": key,
                    "reason": f"the host's apt knows no candidate for {PACKAGE} (dpdk-testpmd)"}
        else:
            try:
                info = self._fetch(version)
            except FetchError as exc:
                info = {"status": "missing", "reason": str(exc)}
                if refresh is not None:  # stale lists name a file the archive no longer has
                    self.log(f"dpdk-testpmd: {exc}; apt-get update and one more try")
                    refresh()
                    version = candidate(PACKAGE) or version
                    key = f"{VERSION}:{PACKAGE}={version}"
                    try:
                        info = self._fetch(version)
                    except FetchError as again:
                        info = {"status": "missing", "reason": str(again)}
            info["key"] = key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest.write_text(json.dumps(info, indent=1))
        return info

    def _download(self, packages: list[str]) -> list[Path]:
        """`apt-get download` of packages (candidate versions) into self.debs, in one call."""
        before = set(self.debs.glob("*.deb"))
        cmd = ["apt-get", "-qq", "-oAPT::Sandbox::User=root", "download", *packages]
        res = _run(cmd, cwd=self.debs)
        if res.returncode != 0:
            raise FetchError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-600:]}")
        return sorted(set(self.debs.glob("*.deb")) - before)

    def _fetch(self, version: str) -> dict[str, Any]:
        for d in (self.root, self.debs):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        depends = _run(["apt-cache", "show", f"{PACKAGE}={version}"]).stdout
        abi = re.search(r"\blibrte-eal(\d+)\b", depends)
        if not abi:
            raise FetchError(f"{PACKAGE} {version} depends on no librte-eal<ABI> package")
        plugins = [(f"{stem}{abi.group(1)}", f"{stem.replace('-', '_')}.so.{abi.group(1)}")
                   for stem in PLUGINS]
        wanted = [PACKAGE, *(p for p, _ in plugins)]
        fetched: list[str] = []
        for level in range(MAX_LEVELS):
            self.log(f"dpdk-testpmd: level {level}: fetching {len(wanted)} package(s)")
            for deb in self._download(wanted):
                self._extract(deb)
            fetched += wanted
            preload = plugin_paths(self.root, [s for _, s in plugins])
            if len(preload) != len(plugins) or not (self.root / BINARY).exists():
                raise FetchError(f"{PACKAGE} and its plugins hold no {BINARY} or no "
                                 f"{[s for _, s in plugins]}")
            missing = not_found(self.root, [self.root / BINARY, *preload])
            if not missing:
                debs = sorted(p.name for p in self.debs.glob("*.deb"))
                size = sum(p.stat().st_size for p in self.debs.glob("*.deb"))
                return {"status": "ok", "version": version, "packages": debs,
                        "deb_bytes": size, "binary": str(self.root / BINARY),
                        "preload": [str(p) for p in preload],
                        "lib_dirs": [str(d) for d in lib_dirs(self.root)]}
            named = {s: soname_package(s) for s in missing}
            known = candidates(sorted(set(named.values()) - set(fetched)))
            wanted = sorted(p for p, v in known.items() if v is not None)
            odd = sorted(s for s, p in named.items() if p not in fetched and known.get(p) is None)
            found = self._by_shlibs(odd, fetched + wanted) if odd else []
            # Named otherwise (libmlx5.so.1 is ibverbs-providers'): found through the Depends.
            fetched += found
            if not wanted and not found:
                raise FetchError(f"no package provides {missing} (tried {sorted(fetched)})")
        raise FetchError(f"library closure not complete after {MAX_LEVELS} levels")

    def _extract(self, deb: Path) -> None:
        res = _run(["dpkg-deb", "-x", str(deb), str(self.root)])
        if res.returncode != 0:
            raise FetchError(f"dpkg-deb -x {deb.name} failed: {res.stderr.strip()}")

    def _by_shlibs(self, sonames: list[str], taken: list[str]) -> list[str]:
        """The packages, among the Depends of those fetched, whose shlibs file (Debian's soname
        -> package map, a control file of each library package) names one of `sonames`:
        downloaded together, the matches extracted, the others deleted."""
        depends: set[str] = set()
        for deb in self.debs.glob("*.deb"):
            field = _run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
            depends |= {re.split(r"[\s(|]", d.strip())[0] for d in field.split(",") if d.strip()}
        left = sorted(p for p in depends - set(taken) - self.tried
                      if p and not p.endswith("-dev"))
        # A name ending in a digit is a library package named after its own soname (policy
        # 8.1), not ours: those are tried only when the others provide nothing.
        used: list[str] = []
        for tries in ([p for p in left if not p[-1].isdigit()],
                      [p for p in left if p[-1].isdigit()]):
            if not tries:
                continue
            self.log(f"dpdk-testpmd: {sonames}: looking in the shlibs of {tries}")
            self.tried |= set(tries)
            for deb in self._download(tries):
                shlibs = _run(["dpkg-deb", "-I", str(deb), "shlibs"]).stdout
                provided = {f"{a}.so.{b}"
                            for a, b in re.findall(r"^(\S+)\s+(\S+)", shlibs, re.MULTILINE)}
                if provided & set(sonames):
                    self._extract(deb)
                    used.append(deb.name.split("_")[0])
                else:
                    deb.unlink()
            if used:
                break
        return used


class FetchError(Exception):
    pass


def command(info: dict[str, Any], sock: Path, lcores: str, log_level: str = "notice",
            ) -> tuple[list[str], dict[str, str]]:
    """testpmd serving `sock` (vhost-user server; QEMU connects) in 5tswap mode: every frame
    goes back with its MAC, IP and TCP/UDP source and destination swapped. No hugepages, no PCI,
    no shared files, no telemetry socket; one forwarding core; started at once (not
    interactive; it exits when its stdin closes). Returns (argv, environment)."""
    cmd = [info["binary"], "-l", lcores, "--no-huge", "-m", "256", "--no-pci", "--no-shconf",
           "--no-telemetry", f"--log-level={log_level}",
           "--vdev", f"net_vhost0,iface={sock},queues=1,client=0", "--",
           "--forward-mode=5tswap", "--nb-cores=1", "--rxq=1", "--txq=1",
           "--total-num-mbufs=8192"]
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(info["lib_dirs"]),
               LD_PRELOAD=":".join(info["preload"]))
    return cmd, env
