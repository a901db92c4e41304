#!/usr/bin/env python3
"""Build, or take from the cache, every image the real-Xen end-to-end run boots.

Everything comes from Debian packages: host tools from the host's apt; the arm64 packages of the
chosen suite (default bookworm) through a private apt configuration (see aptdeb.py). Outputs, in
`$VMMIOD_E2E_CACHE/<suite>/out/` (default ~/.cache/vmmiod/e2e):

  xen            the Xen hypervisor rebuilt from Debian's source package with CONFIG_IOREQ_SERVER
  xen.config     its .config
  vmlinuz        Debian's arm64 Linux kernel (dom0 and domU)
  dom0.cpio      dom0 initramfs: Xen tools, python3 + vmmiod's runtime deps, busybox, the domU
                 kernel and the domU base initramfs; its /init mounts the 9p shares and runs
                 tests/e2e/xen/dom0.sh from the checkout
  manifest.json  versions of what was built

Each step is keyed by its inputs (stamp files); a warm run downloads and builds nothing.
Usage: build.py [--suite SUITE] [--refresh]   (--refresh re-reads the package lists)
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import aptdeb
import images
import stagecache
from stagecache import cache_lock

default_cache = functools.partial(stagecache.default_cache, "VMMIOD_E2E_CACHE", "e2e")

HOST_TOOLS = {  # command -> Debian package providing it on the host
    "qemu-system-aarch64": "qemu-system-arm",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "aarch64-linux-gnu-ld": "binutils-aarch64-linux-gnu",
    "qemu-aarch64-static": "qemu-user-static",
    "flex": "flex",
    "bison": "bison",
    "make": "make",
    "gcc": "gcc",
    "dpkg-source": "dpkg-dev",
    "cpio": "cpio",
    "zstd": "zstd",
    "xz": "xz-utils",
    "depmod": "kmod",
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
}
# Hypervisor options on top of Debian's own (debian/xen-kconfig + olddefconfig): Debian's arm64
# build lacks the IOREQ server, without which dm_op returns ENOSYS.
XEN_EXTRA_CONFIG = "CONFIG_EXPERT=y\nCONFIG_IOREQ_SERVER=y\n"
DOM0_PACKAGES = [
    "xenstore-utils", "busybox-static", "python3", "python3-yaml", "python3-structlog",
    "python3-uvloop",
]
# Pulled in by dependencies but useless in a RAM-only dom0 without a package manager.
DOM0_SKIP = {
    "udev", "dpkg", "tar", "passwd", "adduser", "debconf", "ucf", "sysvinit-utils",
    "libpam-modules", "libpam-modules-bin", "libpam0g", "libsemanage2", "libsemanage-common",
    "media-types", "readline-common", "sensible-utils", "perl-base",
}
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[e2e-build {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


STEP_TIMEOUT = 1200  # seconds for any one download or build command


def sh(*cmd: str | Path, cwd: Path | None = None, quiet: bool = True) -> None:
    try:
        res = subprocess.run([str(c) for c in cmd], cwd=cwd, text=True, timeout=STEP_TIMEOUT, check=False,
                             stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"e2e-build: {' '.join(str(c) for c in cmd)} timed out ({STEP_TIMEOUT}s)")
    if res.returncode != 0:
        sys.stdout.write((res.stdout or "")[-6000:])
        raise SystemExit(f"e2e-build: {' '.join(str(c) for c in cmd)} failed ({res.returncode})")


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fresh(stamp: Path, key: str, *outputs: Path) -> bool:
    return stamp.exists() and stamp.read_text() == key and all(o.exists() for o in outputs)


def ensure_host_tools() -> None:
    missing = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"e2e-build: missing host packages (install them as root): {missing}")
    log(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=STEP_TIMEOUT)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   env=env, check=True, stdout=subprocess.DEVNULL, timeout=STEP_TIMEOUT)


class Build:
    def __init__(self, cache: Path, suite: str, refresh: bool) -> None:
        self.suite = suite
        self.top = cache / suite
        self.out = self.top / "out"
        self.work = self.top / "work"
        self.apt = aptdeb.PrivateApt(self.top / "apt", suite)
        self.refresh = refresh
        for d in (self.out, self.work):
            d.mkdir(parents=True, exist_ok=True)

    # -- packages ------------------------------------------------------------------------------
    def packages(self) -> None:
        self.apt.configure()
        if self.refresh or not any(self.apt.lists.glob("*_Packages*")):
            log(f"apt update ({self.suite}, arm64, private configuration)")
            self.apt.update()
        system = self.apt.depends("xen-system-arm64")
        self.xen_utils = next(p for p in system if p.startswith("xen-utils-") and p[10:11].isdigit())
        self.xen_version = self.xen_utils.removeprefix("xen-utils-")
        self.kernel_pkg = self.apt.depends("linux-image-arm64")[0]
        wanted = [self.xen_utils, *DOM0_PACKAGES]
        stamp = self.top / "packages.stamp"
        lists = sorted((p.name, p.stat().st_mtime) for p in self.apt.lists.glob("*Release"))
        key = key_of(wanted, self.kernel_pkg, lists)
        if fresh(stamp, key, self.top / "packages.json"):
            self.debs = json.loads((self.top / "packages.json").read_text())
            log(f"packages: cached ({len(self.debs['dom0'])} for dom0, kernel {self.kernel_pkg})")
            return
        log(f"downloading arm64 packages: {' '.join(wanted)} {self.kernel_pkg} and their closure")
        closure = self.apt.resolve(wanted)
        self.apt.download(wanted)
        self.apt.run("apt-get", "download", self.kernel_pkg, cwd=self.apt.archives())
        arch = self.apt.archives()
        debs: dict[str, list[str]] = {"dom0": [], "kernel": []}
        for name, version in closure:
            if name in DOM0_SKIP:
                continue
            debs["dom0"].append(str(self._deb_path(arch, name, version)))
        kver = dict(self.apt.resolve([self.kernel_pkg]))[self.kernel_pkg]
        debs["kernel"].append(str(self._deb_path(arch, self.kernel_pkg, kver)))
        debs["versions"] = dict(closure) | {self.kernel_pkg: kver}  # type: ignore[assignment]
        (self.top / "packages.json").write_text(json.dumps(debs, indent=1))
        stamp.write_text(key)
        self.debs = debs
        log(f"packages: {len(debs['dom0'])} for dom0, kernel {self.kernel_pkg} {kver}")

    @staticmethod
    def _deb_path(arch: Path, name: str, version: str) -> Path:
        ver = re.sub(r"^\d+:", "", version)
        hits = [p for p in arch.glob(f"{name}_*.deb")
                if p.name.replace("%3a", ":").split("_")[1].split(":")[-1] == ver]
        if not hits:
            raise SystemExit(f"e2e-build: {name} {version} was not downloaded into {arch}")
        return hits[0]

    # -- hypervisor ----------------------------------------------------------------------------
    def hypervisor(self) -> None:
        src = self.top / "src"
        stamp = self.top / "xen.stamp"
        dscs = sorted(src.glob("xen_*.dsc")) if src.exists() else []
        key = key_of(XEN_EXTRA_CONFIG, [d.name for d in dscs], images.VERSION)
        if dscs and fresh(stamp, key, self.out / "xen", self.out / "xen.config"):
            log(f"hypervisor: cached ({dscs[-1].name})")
            return
        if not dscs:
            log(f"downloading the xen source package ({self.suite} main)")
            self.apt.source("xen", src)
            dscs = sorted(src.glob("xen_*.dsc"))
            key = key_of(XEN_EXTRA_CONFIG, [d.name for d in dscs], images.VERSION)
        tree = self.work / "xen-src"
        shutil.rmtree(tree, ignore_errors=True)
        log(f"unpacking {dscs[-1].name}")
        sh("dpkg-source", "--no-check", "-x", dscs[-1], tree)
        config = (tree / "debian" / "xen-kconfig").read_text() + XEN_EXTRA_CONFIG
        (tree / "xen" / ".config").write_text(config)
        make = ["make", "-C", "xen", "XEN_TARGET_ARCH=arm64",
                "CROSS_COMPILE=aarch64-linux-gnu-"]
        sh(*make, "olddefconfig", cwd=tree)
        built = (tree / "xen" / ".config").read_text()
        if "CONFIG_IOREQ_SERVER=y" not in built:
            raise SystemExit("e2e-build: olddefconfig dropped CONFIG_IOREQ_SERVER")
        log(f"building the hypervisor (make -j{os.cpu_count()})")
        sh(*make, f"-j{os.cpu_count()}", "xen", cwd=tree)
        shutil.copy(tree / "xen" / "xen", self.out / "xen")
        shutil.copy(tree / "xen" / ".config", self.out / "xen.config")
        shutil.rmtree(tree, ignore_errors=True)
        stamp.write_text(key)
        log("hypervisor built")

    # -- kernel and initramfs images -----------------------------------------------------------
    def images(self) -> None:
        stamp = self.top / "images.stamp"
        key = key_of(self.debs["dom0"], self.debs["kernel"], images.VERSION, images.DOM0_INIT,
                     images.DOM0_MODULES, images.DOMU_MODULES)
        outs = [self.out / "vmlinuz", self.out / "dom0.cpio"]
        if fresh(stamp, key, *outs):
            log("images: cached")
            return
        log("assembling the kernel, the domU base initramfs and the dom0 initramfs")
        kinfo = images.build_all(
            work=self.work, out=self.out, dom0_debs=[Path(p) for p in self.debs["dom0"]],
            kernel_deb=Path(self.debs["kernel"][0]), log=log,
        )
        manifest = {
            "suite": self.suite, "xen_utils": self.xen_utils, "kernel": kinfo,
            "versions": self.debs["versions"],
            "hypervisor_source": sorted(p.name for p in (self.top / "src").glob("*.dsc")),
        }
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        stamp.write_text(key)
        log(f"images built: dom0.cpio {(self.out / 'dom0.cpio').stat().st_size >> 20} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--suite", default=os.environ.get("VMMIOD_E2E_SUITE", "bookworm"))
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--refresh", action="store_true", help="re-read the package lists")
    args = ap.parse_args()
    ensure_host_tools()
    with cache_lock(args.cache.expanduser()):
        b = Build(args.cache.expanduser(), args.suite, args.refresh)
        b.packages()
        b.hypervisor()
        b.images()
    print(b.out)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
