#!/usr/bin/env python3
"""Build, or take from the cache, the x86_64 guest of the vhost-user end-to-end run.

Everything comes from Debian packages of the archive the host's apt sources name:
- host tools (QEMU, qemu-storage-daemon, fio, e2fsprogs, iperf3, cpio, kmod), installed with
  apt-get when missing;
- the kernel that linux-image-amd64 depends on and busybox-static, fetched with `apt-get
  download` into the cache and unpacked there (`dpkg-deb -x`; depmod on the extracted tree);
- the guest's fio, mke2fs and iperf3 are the host's own binaries with every library ldd resolves;
- dpdk-testpmd, the net side by side's reference back-end: the closure of its shared libraries
  and two plugins, fetched with `apt-get download` and unpacked under `dpdk/` (testpmd.py); when
  that fails the net side by side is skipped with the reason, nothing else.

Outputs in `$VMMIOD_VU_CACHE/out/` (default ~/.cache/vmmiod/vhost-user): `vmlinuz`,
`initramfs.cpio` (uncompressed: nothing to inflate under TCG), `manifest.json`. The image's
/init mounts the run's results folder (9p, tag `out`) and runs `guest.sh` from there, so a change
to the workload rebuilds nothing. Every step is keyed by its inputs (a stamp file): a warm build
downloads and builds nothing.
Usage: build.py [--cache DIR]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "xen"))
sys.path.insert(1, str(HERE.parent))
import images  # the Xen stage's generic helpers: rootfs, .deb, modules, cpio
import stagecache
import testpmd
from stagecache import cache_lock  # shared by the e2e stages, with default_cache

default_cache = functools.partial(stagecache.default_cache, "VMMIOD_VU_CACHE", "vhost-user")

VERSION = 2  # bump when the assembly changes in a way the stamp cannot see
HOST_TOOLS = {  # command -> Debian package providing it on the host
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-storage-daemon": "qemu-system-common",
    "fio": "fio",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "iperf3": "iperf3",
    "cpio": "cpio",
    "depmod": "kmod",
    "dpkg-deb": "dpkg",
    "ip": "iproute2",
}
# Host binaries copied into the guest with their library closure: (host path, guest path).
GUEST_BINARIES = [("/usr/bin/fio", "usr/bin/fio"), ("/usr/sbin/mke2fs", "usr/sbin/mke2fs"),
                  ("/usr/bin/iperf3", "usr/bin/iperf3")]
# virtio over PCI (q35) and over MMIO (microvm: devices found in the ACPI tables), the three
# drivers, ext4 (+ crc32c through the crypto API: crc32c_intel needs SSE4.2, which TCG's default
# CPU lacks), 9p for the results share.
GUEST_MODULES = [
    "virtio_pci", "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net", "virtio_console",
    "crc32c_generic", "ext4", "9pnet_virtio", "9p",
]
GUEST_INIT = r"""#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /out /mnt /tmp /run
for m in virtio_pci virtio_mmio virtio_blk virtio_net virtio_console crc32c_generic ext4 9pnet_virtio 9p; do
    modprobe $m || echo "E2E-R init module=$m failed"
done
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /out && [ -f /out/guest.sh ]; then
    echo "E2E-R init ok"
    /bin/busybox sh /out/guest.sh
    echo "E2E-R init script_exit=$?"
else
    echo "E2E-R init status=no-share"
fi
sync
poweroff -f
"""
STEP_TIMEOUT = 900
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[vu-build {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def sh(*cmd: str | Path, cwd: Path | None = None) -> str:
    try:
        res = subprocess.run([str(c) for c in cmd], cwd=cwd, text=True, timeout=STEP_TIMEOUT,
                             check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"vu-build: {' '.join(map(str, cmd))} timed out ({STEP_TIMEOUT}s)")
    if res.returncode != 0:
        sys.stdout.write(res.stdout[-4000:])
        raise SystemExit(f"vu-build: {' '.join(map(str, cmd))} failed ({res.returncode})")
    return res.stdout


def apt_env() -> dict[str, str]:
    return dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")


def ensure_host_tools() -> None:
    missing = sorted({pkg for cmd, pkg in HOST_TOOLS.items()
                      if shutil.which(cmd) is None and not Path("/usr/sbin", cmd).exists()})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"vu-build: missing host packages (install them as root): {missing}")
    log(f"installing host packages: {' '.join(missing)}")
    subprocess.run(["apt-get", "update", "-qq"], env=apt_env(), check=True, timeout=STEP_TIMEOUT)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   env=apt_env(), check=True, stdout=subprocess.DEVNULL, timeout=STEP_TIMEOUT)


def candidate(package: str) -> str:
    out = sh("apt-cache", "policy", package)
    m = re.search(r"Candidate: (\S+)", out)
    if not m or m.group(1) == "(none)":
        raise SystemExit(f"vu-build: the host's apt knows no candidate for {package}"
                         " (apt-get update?)")
    return m.group(1)


def kernel_package() -> str:
    out = sh("apt-cache", "depends", "--no-recommends", "--no-suggests", "linux-image-amd64")
    deps = re.findall(r"^\s+Depends: (linux-image-\S+)", out, re.MULTILINE)
    if not deps:
        raise SystemExit("vu-build: linux-image-amd64 depends on no linux-image-* package")
    return str(deps[0])


def download(package: str, version: str, dest: Path) -> Path:
    """`apt-get download` of one package (the host's own apt and archive) into dest."""
    ver = version.split(":")[-1]
    for p in dest.glob(f"{package}_*.deb"):
        if p.name.replace("%3a", ":").split("_")[1].split(":")[-1] == ver:
            return p
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", "-qq", "-oAPT::Sandbox::User=root", "download", f"{package}={version}"]
    res = subprocess.run(cmd, cwd=dest, env=apt_env(), text=True, capture_output=True,
                         timeout=STEP_TIMEOUT, check=False)
    if res.returncode != 0:
        raise SystemExit(f"vu-build: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return download(package, version, dest)


def ldd_closure(binary: str) -> list[Path]:
    """Every library (resolved path as ldd prints it) the dynamic loader needs for binary."""
    libs: list[Path] = []
    for line in sh("ldd", binary).splitlines():
        m = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def file_key(paths: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in paths]


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def copy_closure(root: Path) -> list[Path]:
    libs: list[Path] = []
    for host, guest in GUEST_BINARIES:
        # Unlink first: busybox's applet links (mke2fs is one) must be replaced, not written
        # through.
        (root / guest).unlink(missing_ok=True)
        shutil.copy2(host, root / guest)
        for lib in ldd_closure(host):
            if lib not in libs:
                libs.append(lib)
    lib_dirs: set[str] = set()
    for lib in libs:
        # Merged /usr: /lib/x86_64-linux-gnu and /lib64 live under /usr in the guest.
        rel = Path("usr") / (lib.relative_to("/usr") if lib.is_relative_to("/usr")
                             else lib.relative_to("/"))
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        shutil.copyfile(lib, dest)  # follows the soname symlink: the real file under its soname
        os.chmod(dest, 0o755)
        lib_dirs.add("/" + str(rel.parent))
    if not (root / "lib64").exists():
        (root / "lib64").symlink_to("usr/lib64")  # the dynamic loader's path (PT_INTERP)
    (root / "etc/ld.so.conf").write_text("\n".join(sorted(lib_dirs)) + "\n")
    sh("ldconfig", "-r", root)
    shutil.copy2("/etc/mke2fs.conf", root / "etc/mke2fs.conf")
    return libs


class Build:
    def __init__(self, cache: Path) -> None:
        self.top = cache
        self.out = cache / "out"
        self.work = cache / "work"
        self.debs = cache / "debs"
        for d in (self.out, self.work, self.debs):
            d.mkdir(parents=True, exist_ok=True)

    def run(self) -> Path:
        try:
            kpkg = kernel_package()
            kver_deb, bb_ver = candidate(kpkg), candidate("busybox-static")
        except SystemExit:
            log("apt-get update (no candidate in the host's lists)")
            subprocess.run(["apt-get", "update", "-qq"], env=apt_env(), check=True,
                           timeout=STEP_TIMEOUT)
            kpkg = kernel_package()
            kver_deb, bb_ver = candidate(kpkg), candidate("busybox-static")
        closure = [Path(h) for h, _ in GUEST_BINARIES]
        for host, _ in GUEST_BINARIES:
            closure += ldd_closure(host)
        key = key_of(VERSION, kpkg, kver_deb, bb_ver, GUEST_INIT, GUEST_MODULES,
                     file_key(sorted(set(closure))), Path(images.__file__).read_text())
        stamp = self.top / "images.stamp"
        outs = [self.out / "vmlinuz", self.out / "initramfs.cpio", self.out / "manifest.json"]
        if stamp.exists() and stamp.read_text() == key and all(o.exists() for o in outs):
            log(f"images: cached ({kpkg} {kver_deb})")
            return self.out
        log(f"downloading {kpkg} {kver_deb} and busybox-static {bb_ver}")
        kdeb = download(kpkg, kver_deb, self.debs)
        bdeb = download("busybox-static", bb_ver, self.debs)
        kroot = self.work / "kernel"
        shutil.rmtree(kroot, ignore_errors=True)
        kroot.mkdir(parents=True)
        sh("dpkg-deb", "-x", kdeb, kroot)
        kver = next((kroot / "lib/modules").iterdir()).name
        sh("depmod", "-b", kroot, kver)  # the .deb ships no modules.dep (its postinst makes it)
        root = self.work / "root"
        images.merged_usr_root(root)
        bbroot = self.work / "busybox"
        shutil.rmtree(bbroot, ignore_errors=True)
        sh("dpkg-deb", "-x", bdeb, bbroot)
        shutil.copy2(bbroot / "bin/busybox", root / "usr/bin/busybox")
        for rel in sh(root / "usr/bin/busybox", "--list-full").split():
            dest = root / "usr" / rel.removeprefix("usr/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists() and not dest.is_symlink():
                # Relative: an absolute link would point at the host's file while building.
                dest.symlink_to(os.path.relpath(root / "usr/bin/busybox", dest.parent))
        log("guest binaries and their libraries (ldd)")
        libs = copy_closure(root)
        (root / "usr/sbin/mkfs.ext4").unlink(missing_ok=True)
        (root / "usr/sbin/mkfs.ext4").symlink_to("mke2fs")
        images.install_modules(kroot, kver, GUEST_MODULES, root)
        (root / "init").write_text(GUEST_INIT)
        os.chmod(root / "init", 0o755)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
        log("packing initramfs.cpio")
        shutil.copy2(kroot / "boot" / f"vmlinuz-{kver}", self.out / "vmlinuz")
        images.pack_cpio(root, self.out / "initramfs.cpio")
        size = (self.out / "initramfs.cpio").stat().st_size
        manifest = {"kernel_package": kpkg, "kernel_deb_version": kver_deb, "kernel": kver,
                    "busybox_static": bb_ver, "libraries": len(libs),
                    "initramfs_bytes": size}
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for d in (kroot, root, bbroot):
            shutil.rmtree(d, ignore_errors=True)
        stamp.write_text(key)
        log(f"images built: initramfs {size >> 20} MiB, kernel {kver}")
        return self.out

    def testpmd(self) -> dict[str, object]:
        """dpdk-testpmd fetched (or taken from the cache) under dpdk/; `status` ok or missing."""
        def refresh() -> None:
            log("apt-get update (for dpdk-testpmd)")
            subprocess.run(["apt-get", "update", "-qq"], env=apt_env(), check=False,
                           timeout=STEP_TIMEOUT)

        info = testpmd.Fetch(self.top, log).run(refresh)
        if info["status"] == "ok":
            log(f"dpdk-testpmd {info['version']}: {len(info['packages'])} packages, "
                f"{info['deb_bytes'] >> 20} MiB of .debs")
        else:
            log(f"dpdk-testpmd unavailable (the net side by side will be skipped): "
                f"{info['reason']}")
        return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cache", type=Path, default=default_cache())
    args = ap.parse_args()
    ensure_host_tools()
    with cache_lock(args.cache.expanduser()):
        build = Build(args.cache.expanduser())
        out = build.run()
        build.testpmd()  # never fails the build: the net side by side is skipped instead
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
