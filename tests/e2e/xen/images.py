"""Assemble the kernel and the initramfs images of the end-to-end run from extracted .debs.

Why initramfs only: nothing is written to a disk image, every boot starts from the same state, and
the parts that change with the project (vmmiod, the test scripts) come over a 9p share instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

VERSION = 4  # bump when the assembly below changes in a way the stamps cannot see

# dom0: event channels, privcmd (hypercalls, foreign mapping, dm_op), grants, xenfs for
# /proc/xen, TAP and bridging for the net backend, 9p for the shares.
DOM0_MODULES = [
    "xen-evtchn", "xen-privcmd", "xen-gntdev", "xen-gntalloc", "xenfs", "tun", "bridge",
    "virtio_mmio", "9pnet_virtio", "9p",
]
# domU: the virtio-mmio transport and the three drivers under test (failover before net, as
# modprobe would), ext4 to mount the ext2 filesystem the guest makes (ext4 serves ext2 in
# Debian's kernel), crc32c which ext4 asks for through the crypto API.
DOMU_MODULES = [
    "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net", "virtio_console",
    "ext4", "crc32c_generic", "libcrc32c",
]
# Started by tests/e2e/xen/dom0.sh, which lives in the checkout, so changing the test does not
# rebuild this image. Everything here must stay generic.
DOM0_INIT = r"""#!/bin/busybox sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /src /out /var/log /var/run /var/lib/xen /var/lib/xenstored
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
modprobe -a virtio_mmio 9pnet_virtio 9p
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro src /src
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /out
echo "E2E dom0 init: shares mounted"
if [ -f /out/dom0.sh ]; then
    /bin/busybox sh /out/dom0.sh
    echo "E2E dom0 script exit $?"
else
    echo "E2E dom0 script missing"
fi
sync
poweroff -f
"""
PRUNE = [
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
    "usr/share/bug", "usr/share/zoneinfo", "usr/share/i18n", "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/idlelib", "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/turtledemo",
    "usr/lib/python3.11/lib2to3", "usr/share/xen", "boot",
]

Log = Callable[[str], None]


def run(*cmd: str | Path, cwd: Path | None = None, stdout: int | None = None) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, text=True, stdout=stdout or subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=900, check=False)
    if res.returncode != 0:
        raise SystemExit(f"e2e-build: {' '.join(map(str, cmd))} failed:\n{res.stderr[-4000:]}")
    return res.stdout or ""


def merged_usr_root(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    for d in ("usr/bin", "usr/sbin", "usr/lib", "etc", "dev", "proc", "sys", "tmp", "run", "var",
              "mnt", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for d in ("bin", "sbin", "lib"):
        (root / d).symlink_to(f"usr/{d}")
    (root / "var/run").symlink_to("../run")  # as on Debian: libxl keeps its locks in /var/run/xen


def extract_deb(deb: Path, root: Path) -> None:
    # --keep-directory-symlink: extracting ./bin/x must go through the merged-/usr symlink.
    tar = subprocess.Popen(["tar", "-x", "--keep-directory-symlink", "-C", str(root)],
                           stdin=subprocess.PIPE)
    subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=tar.stdin, check=True)
    assert tar.stdin is not None
    tar.stdin.close()
    if tar.wait() != 0:
        raise SystemExit(f"e2e-build: extracting {deb.name} failed")


def busybox_links(root: Path) -> None:
    bb = root / "usr/bin/busybox"
    if not bb.exists():
        shutil.copy2(root / "bin/busybox", bb)
    applets = run("qemu-aarch64-static", bb, "--list-full").split()
    for rel in applets:
        dest = root / "usr" / rel.removeprefix("usr/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists() and not dest.is_symlink():
            dest.symlink_to("/usr/bin/busybox")


def modules_closure(kroot: Path, kver: str, wanted: list[str]) -> list[str]:
    """Module files (relative to lib/modules/<kver>) for `wanted` and their dependencies."""
    moddir = kroot / "lib/modules" / kver
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        deps[name] = (path, rest.split())
    builtin = {Path(p).name.split(".ko")[0].replace("-", "_")
               for p in (moddir / "modules.builtin").read_text().split()}
    files: list[str] = []
    for mod in wanted:
        key = mod.replace("-", "_")
        if key in builtin:
            continue
        if key not in deps:
            raise SystemExit(f"e2e-build: kernel module {mod} not found in {kver}")
        path, dep_paths = deps[key]
        for p in [*dep_paths, path]:
            if p not in files:
                files.append(p)
    return files


def install_modules(kroot: Path, kver: str, wanted: list[str], root: Path) -> None:
    src = kroot / "lib/modules" / kver
    dest = root / "usr/lib/modules" / kver
    for rel in modules_closure(kroot, kver, wanted):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dest / rel)
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy2(src / meta, dest / meta)
    run("depmod", "-b", root, kver)


def pack_cpio(root: Path, dest: Path) -> None:
    """A newc archive owned by root, in a stable order (the kernel unpacks it as the rootfs)."""
    names = run("find", ".", "-mindepth", "1", cwd=root).split("\n")
    listing = "\n".join(sorted(n for n in names if n)) + "\n"
    with open(dest, "wb") as out:
        res = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root,
                             input=listing.encode(), stdout=out, stderr=subprocess.PIPE, check=False)
    if res.returncode != 0:
        raise SystemExit(f"e2e-build: cpio failed: {res.stderr.decode()[-2000:]}")


def build_kernel(work: Path, out: Path, kernel_deb: Path) -> tuple[Path, str]:
    kroot = work / "kernel"
    shutil.rmtree(kroot, ignore_errors=True)
    kroot.mkdir(parents=True)
    run("dpkg-deb", "-x", kernel_deb, kroot)
    kver = next((kroot / "lib/modules").iterdir()).name
    shutil.copy2(kroot / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
    run("depmod", "-b", kroot, kver)
    return kroot, kver


def build_domu_base(work: Path, kroot: Path, kver: str, busybox: Path) -> Path:
    root = work / "domU-root"
    merged_usr_root(root)
    shutil.copy2(busybox, root / "usr/bin/busybox")
    busybox_links(root)
    install_modules(kroot, kver, DOMU_MODULES, root)
    dest = work / "domU-base.cpio"
    pack_cpio(root, dest)
    return dest


def build_dom0(work: Path, out: Path, debs: list[Path], kroot: Path, kver: str, log: Log) -> None:
    root = work / "dom0-root"
    merged_usr_root(root)
    for deb in debs:
        extract_deb(deb, root)
    for rel in PRUNE:
        shutil.rmtree(root / rel, ignore_errors=True)
    busybox_links(root)
    install_modules(kroot, kver, DOM0_MODULES, root)
    log("domU base initramfs")
    domu = build_domu_base(work, kroot, kver, root / "usr/bin/busybox")
    e2e = root / "e2e"
    e2e.mkdir()
    shutil.copy2(domu, e2e / "domU-base.cpio")
    shutil.copy2(out / "vmlinuz", e2e / "vmlinuz")
    (root / "init").write_text(DOM0_INIT)
    os.chmod(root / "init", 0o755)
    (root / "etc/hostname").write_text("dom0\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    py = next((root / "usr/bin").glob("python3.[0-9]*"))
    log(f"precompiling python ({py.name}, under qemu-user)")
    # The rootfs is read-only in spirit and dom0 runs under TCG: compiling the stdlib there on
    # every boot would cost seconds per import, so the .pyc files ship in the image.
    libs = [p for p in (root / "usr/lib").glob("python3*") if p.is_dir()]
    run("qemu-aarch64-static", "-L", root, py, "-m", "compileall", "-q", "-j0", "-s", root, "-p",
        "/", *libs)
    log("packing dom0.cpio")
    pack_cpio(root, out / "dom0.cpio")


def build_all(work: Path, out: Path, dom0_debs: list[Path], kernel_deb: Path, log: Log) -> dict[str, str]:
    log(f"kernel from {kernel_deb.name}")
    kroot, kver = build_kernel(work, out, kernel_deb)
    log(f"dom0 root from {len(dom0_debs)} packages")
    build_dom0(work, out, dom0_debs, kroot, kver, log)
    shutil.rmtree(work / "dom0-root", ignore_errors=True)
    shutil.rmtree(work / "domU-root", ignore_errors=True)
    shutil.rmtree(kroot, ignore_errors=True)
    return {"version": kver, "deb": kernel_deb.name}
