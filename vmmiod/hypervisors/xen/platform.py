"""What the Xen adaptor checks of the platform before it serves: the /dev/xen nodes and the
hypervisor's dm_op (IOREQ server) support, each failure one message saying what to do."""

from __future__ import annotations

import errno
import os

from vmmiod.hypervisors.base import PlatformUnavailable
from vmmiod.hypervisors.xen.handles import DeviceModel

NO_IOREQ_SERVER = (
    "the Xen hypervisor has no IOREQ server support (dm_op failed with ENOSYS). Debian's arm64 "
    "Xen is built without CONFIG_IOREQ_SERVER: rebuild the hypervisor from Debian's xen source "
    "package with CONFIG_EXPERT=y and CONFIG_IOREQ_SERVER=y (see docs/xen.md), or use a Xen "
    "built with it (amd64 builds have it)")

NODES = {
    "privcmd": "load the xen-privcmd module (modprobe xen-privcmd)",
    "evtchn": "load the xen-evtchn module (modprobe xen-evtchn)",
    "gntdev": "load the xen-gntdev module (modprobe xen-gntdev); needed for grants",
}


def check_nodes(dev_dir: str, names: list[str]) -> None:
    if not os.path.isdir(dev_dir):
        raise PlatformUnavailable(
            f"{dev_dir} does not exist: vmmiod's Xen adaptor must run in a Xen dom0 (or "
            "a driver domain) with the Xen kernel modules loaded (modprobe xen-privcmd "
            "xen-evtchn xen-gntdev)")
    for name in names:
        path = os.path.join(dev_dir, name)
        if not os.path.exists(path):
            raise PlatformUnavailable(f"{path} is missing: {NODES[name]}")


def probe_dm_op(dm: DeviceModel, domid: int) -> int:
    """The guest's vCPU count, by the first dm_op: the probe for IOREQ server support."""
    try:
        return dm.nr_vcpus()
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise PlatformUnavailable(NO_IOREQ_SERVER) from None
        if exc.errno == errno.EOPNOTSUPP:
            raise PlatformUnavailable(
                "the hypervisor does not know XEN_DMOP_nr_vcpus: Xen >= 4.15 is needed"
            ) from None
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise PlatformUnavailable(
                f"not allowed to act as device model for domain {domid} ({exc}): run "
                "vmmiod in dom0, or in a driver domain that is the guest's target "
                "(and with xsm=dummy on Debian's arm64 Xen)") from None
        raise PlatformUnavailable(f"dm_op on domain {domid} failed: {exc}") from None
