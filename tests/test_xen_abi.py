"""The Xen adaptor's ctypes layer against values computed independently.

Each layout is checked twice: against offsets worked out by hand here (with struct, from the
field lists of the C headers), and, when a C compiler and Xen's public headers (libxen-dev) and
Linux's privcmd.h are present, against what the compiler itself says.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess

import pytest

from vmmiod.hypervisors.xen import abi, libs

# -- by hand ---------------------------------------------------------------------------------------


def test_ioreq_slot_layout_by_hand() -> None:
    # uint64 addr, uint64 data, uint32 count, uint32 size, uint32 vp_eport, uint16 _pad0,
    # uint8 bitfields, uint8 type: no padding anywhere, 32 bytes.
    layout = struct.Struct("<QQIIIHBB")
    assert layout.size == 32 == abi.IOREQ_SLOT_SIZE == ctypes.sizeof(abi.IoreqSlot)
    assert abi.IoreqSlot.addr.offset == 0
    assert abi.IoreqSlot.data.offset == 8
    assert abi.IoreqSlot.count.offset == 16
    assert abi.IoreqSlot.size.offset == 20
    assert abi.IOREQ_VP_EPORT_OFFSET == abi.IoreqSlot.vp_eport.offset == 24
    assert abi.IoreqSlot.flags.offset == 30
    assert abi.IoreqSlot.type.offset == 31
    assert abi.MAX_VCPUS == 4096 // 32 == 128
    # A slot built field by field with struct reads back through the ctypes structure.
    raw = layout.pack(0x0200_0050, 0xDEAD_BEEF, 1, 4, 77, 0, 1 | 1 << 5, 1)
    slot = abi.IoreqSlot.from_buffer_copy(raw)
    assert (slot.addr, slot.data, slot.count, slot.size, slot.vp_eport) == (
        0x0200_0050, 0xDEAD_BEEF, 1, 4, 77)
    assert slot.flags & 0xF == 1 and slot.flags >> 5 & 1 == 1 and slot.type == 1


def test_dm_op_layout_by_hand() -> None:
    # struct xen_dm_op { uint32 op; uint32 pad; union u } with set_irq_level
    # { uint32 irq; uint8 level; uint8 pad[3] } at offset 8.
    op = abi.XenDmOp()
    op.op = 19
    op.u.set_irq_level.irq = 33
    op.u.set_irq_level.level = 1
    raw = bytes(op)
    assert struct.unpack_from("<IIIB", raw, 0) == (19, 0, 33, 1)
    assert abi.XenDmOp.u.offset == 8
    assert ctypes.sizeof(abi.XenDmOpSetIrqLevel) == 8
    assert ctypes.sizeof(abi.XenDmOpInjectMsi) == 16  # u32 data, u32 pad, u64 addr
    assert abi.XEN_DMOP_SET_IRQ_LEVEL == 19 and abi.XEN_DMOP_NR_VCPUS == 20
    assert abi.XEN_DMOP_SET_ISA_IRQ_LEVEL == 9 and abi.XEN_DMOP_INJECT_MSI == 14


def test_privcmd_layouts_by_hand() -> None:
    # privcmd_irqfd: u64 dm_op; u32 size; u32 fd; u32 flags; u16 dom; u8 pad[2] -> 24 bytes.
    assert ctypes.sizeof(abi.PrivcmdIrqfd) == struct.calcsize("<QIIIH2x") == 24
    assert [abi.PrivcmdIrqfd.dm_op.offset, abi.PrivcmdIrqfd.size.offset,
            abi.PrivcmdIrqfd.fd.offset, abi.PrivcmdIrqfd.flags.offset,
            abi.PrivcmdIrqfd.dom.offset] == [0, 8, 12, 16, 20]
    # privcmd_ioeventfd: u64 ioreq, ports, addr; u32 addr_len, event_fd, vcpus, vq, flags;
    # u16 dom; u8 pad[2] -> 48 bytes.
    assert ctypes.sizeof(abi.PrivcmdIoeventfd) == struct.calcsize("<QQQIIIIIH2x") == 48
    assert abi.PrivcmdIoeventfd.dom.offset == 44
    assert abi.PrivcmdIoeventfd.vq.offset == 36


def test_ioctl_numbers_by_hand() -> None:
    # _IOW('P', nr, size) = 1 << 30 | size << 16 | ord('P') << 8 | nr
    assert abi.IOCTL_PRIVCMD_IRQFD == 0x4018_5008
    assert abi.IOCTL_PRIVCMD_IOEVENTFD == 0x4030_5009
    from vmmiod.hypervisors.xen.irq import IOCTL_PRIVCMD_RESTRICT

    assert IOCTL_PRIVCMD_RESTRICT == 0x0002_5006  # _IOC(_IOC_NONE, 'P', 6, 2)


def test_constants_by_hand() -> None:
    assert abi.XENMEM_RESOURCE_IOREQ_SERVER == 0
    assert abi.IOREQ_SERVER_FRAME_IOREQ0 == 1  # frame 0 is the buffered ring
    assert abi.HVM_IOREQSRV_BUFIOREQ_OFF == 0
    assert abi.XENBUS_STATE_INITWAIT == 2 and abi.XENBUS_STATE_CLOSING == 5
    assert abi.XENBUS_STATE_CLOSED == 6
    assert ctypes.sizeof(abi.xen_pfn_t) == 8
    assert ctypes.sizeof(abi.domid_t) == 2 and ctypes.sizeof(abi.ioservid_t) == 2


def test_every_prototype_names_a_library_and_a_symbol() -> None:
    attrs = {attr for attr, _pkg in libs.SONAMES.values()}
    for attr, name, _res, args in libs.PROTOTYPES:
        assert attr in attrs, name
        assert all(a is not None for a in args), name


# -- against the C compiler and the real headers ----------------------------------------------------
C_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/hvm/ioreq.h>
#include <xen/hvm/dm_op.h>
#include <xen/memory.h>
#include <xen/io/xenbus.h>
#include <xenstore.h>
int main(void) {
    printf("ioreq_size %zu\n", sizeof(struct ioreq));
    printf("ioreq_vp_eport %zu\n", offsetof(struct ioreq, vp_eport));
    printf("ioreq_type %zu\n", offsetof(struct ioreq, type));
    struct ioreq r = {0}; r.state = 0xf;
    printf("ioreq_state_byte %u\n", ((unsigned char *)&r)[30]);
    r.state = 0; r.dir = 1;
    printf("ioreq_dir_byte %u\n", ((unsigned char *)&r)[30]);
    printf("dm_op_u %zu\n", offsetof(struct xen_dm_op, u));
    printf("set_irq_level_size %zu\n", sizeof(struct xen_dm_op_set_irq_level));
    printf("inject_msi_size %zu\n", sizeof(struct xen_dm_op_inject_msi));
    printf("dmop_set_irq_level %d\n", XEN_DMOP_set_irq_level);
    printf("dmop_nr_vcpus %d\n", XEN_DMOP_nr_vcpus);
    printf("dmop_set_isa_irq_level %d\n", XEN_DMOP_set_isa_irq_level);
    printf("dmop_inject_msi %d\n", XEN_DMOP_inject_msi);
    printf("resource_ioreq_server %d\n", XENMEM_resource_ioreq_server);
    printf("frame_ioreq0 %d\n", XENMEM_resource_ioreq_server_frame_ioreq(0));
    printf("initwait %d\n", XenbusStateInitWait);
    printf("closed %d\n", XenbusStateClosed);
    printf("pfn_size %zu\n", sizeof(xen_pfn_t));
    printf("watch_path %d\n", XS_WATCH_PATH);
    printf("watch_token %d\n", XS_WATCH_TOKEN);
    printf("state_ready %d\n", STATE_IOREQ_READY);
    printf("resp_ready %d\n", STATE_IORESP_READY);
    return 0;
}
"""


def _compile_and_run(tmp_path: os.PathLike[str], source: str) -> dict[str, int]:
    src = os.path.join(tmp_path, "probe.c")
    exe = os.path.join(tmp_path, "probe")
    with open(src, "w") as f:
        f.write(source)
    done = subprocess.run(["cc", "-o", exe, src], check=False, capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        pytest.skip(f"Xen headers not usable here: {done.stderr.strip()[:200]}")
    out = subprocess.run([exe], capture_output=True, text=True, check=True, timeout=10).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_layouts_match_the_c_headers(tmp_path: os.PathLike[str]) -> None:
    if not os.path.exists("/usr/include/xen/hvm/ioreq.h"):
        pytest.skip("Xen public headers not installed (Debian package libxen-dev)")
    c = _compile_and_run(tmp_path, C_PROBE)
    from vmmiod import ioreq

    assert c["ioreq_size"] == abi.IOREQ_SLOT_SIZE
    assert c["ioreq_vp_eport"] == abi.IOREQ_VP_EPORT_OFFSET
    assert c["ioreq_type"] == abi.IoreqSlot.type.offset
    assert c["ioreq_state_byte"] == ioreq.STATE_MASK  # state is the low nibble of byte 30
    assert c["ioreq_dir_byte"] == ioreq.DIR_BIT
    assert c["dm_op_u"] == abi.XenDmOp.u.offset
    assert c["set_irq_level_size"] == ctypes.sizeof(abi.XenDmOpSetIrqLevel)
    assert c["inject_msi_size"] == ctypes.sizeof(abi.XenDmOpInjectMsi)
    assert c["dmop_set_irq_level"] == abi.XEN_DMOP_SET_IRQ_LEVEL
    assert c["dmop_nr_vcpus"] == abi.XEN_DMOP_NR_VCPUS
    assert c["dmop_set_isa_irq_level"] == abi.XEN_DMOP_SET_ISA_IRQ_LEVEL
    assert c["dmop_inject_msi"] == abi.XEN_DMOP_INJECT_MSI
    assert c["resource_ioreq_server"] == abi.XENMEM_RESOURCE_IOREQ_SERVER
    assert c["frame_ioreq0"] == abi.IOREQ_SERVER_FRAME_IOREQ0
    assert c["initwait"] == abi.XENBUS_STATE_INITWAIT
    assert c["closed"] == abi.XENBUS_STATE_CLOSED
    assert c["pfn_size"] == ctypes.sizeof(abi.xen_pfn_t)
    assert c["watch_path"] == abi.XS_WATCH_PATH and c["watch_token"] == abi.XS_WATCH_TOKEN
    assert c["state_ready"] == ioreq.STATE_IOREQ_READY
    assert c["resp_ready"] == ioreq.STATE_IORESP_READY


PRIVCMD_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/types.h>
#include <sys/ioctl.h>
typedef __u16 domid_t;
/* Linux >= 6.7 include/uapi/xen/privcmd.h, for kernels whose headers predate it. */
#ifndef IOCTL_PRIVCMD_IRQFD
struct privcmd_irqfd { __u64 dm_op; __u32 size; __u32 fd; __u32 flags; domid_t dom;
                       __u8 pad[2]; };
struct privcmd_ioeventfd { __u64 ioreq; __u64 ports; __u64 addr; __u32 addr_len;
                           __u32 event_fd; __u32 vcpus; __u32 vq; __u32 flags; domid_t dom;
                           __u8 pad[2]; };
#define IOCTL_PRIVCMD_IRQFD _IOW('P', 8, struct privcmd_irqfd)
#define IOCTL_PRIVCMD_IOEVENTFD _IOW('P', 9, struct privcmd_ioeventfd)
#endif
int main(void) {
    printf("irqfd_size %zu\n", sizeof(struct privcmd_irqfd));
    printf("irqfd_dom %zu\n", offsetof(struct privcmd_irqfd, dom));
    printf("ioeventfd_size %zu\n", sizeof(struct privcmd_ioeventfd));
    printf("ioeventfd_vq %zu\n", offsetof(struct privcmd_ioeventfd, vq));
    printf("ioeventfd_dom %zu\n", offsetof(struct privcmd_ioeventfd, dom));
    printf("ioctl_irqfd %lu\n", (unsigned long)IOCTL_PRIVCMD_IRQFD);
    printf("ioctl_ioeventfd %lu\n", (unsigned long)IOCTL_PRIVCMD_IOEVENTFD);
    printf("ioctl_restrict %lu\n", (unsigned long)_IOC(_IOC_NONE, 'P', 6, sizeof(domid_t)));
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_privcmd_layouts_match_the_compiler(tmp_path: os.PathLike[str]) -> None:
    c = _compile_and_run(tmp_path, PRIVCMD_PROBE)
    from vmmiod.hypervisors.xen.irq import IOCTL_PRIVCMD_RESTRICT

    assert c["irqfd_size"] == ctypes.sizeof(abi.PrivcmdIrqfd)
    assert c["irqfd_dom"] == abi.PrivcmdIrqfd.dom.offset
    assert c["ioeventfd_size"] == ctypes.sizeof(abi.PrivcmdIoeventfd)
    assert c["ioeventfd_vq"] == abi.PrivcmdIoeventfd.vq.offset
    assert c["ioeventfd_dom"] == abi.PrivcmdIoeventfd.dom.offset
    assert c["ioctl_irqfd"] == abi.IOCTL_PRIVCMD_IRQFD
    assert c["ioctl_ioeventfd"] == abi.IOCTL_PRIVCMD_IOEVENTFD
    assert c["ioctl_restrict"] == IOCTL_PRIVCMD_RESTRICT


def test_real_libraries_load_with_every_prototype() -> None:
    try:
        loaded = libs.load_libraries()
    except Exception as exc:  # noqa: BLE001 - the point is to say why
        pytest.skip(f"Debian's Xen libraries are not installed here: {exc}")
    for attr, name, restype, argtypes in libs.PROTOTYPES:
        fn = getattr(getattr(loaded, attr), name)
        assert fn.restype is restype and fn.argtypes == argtypes
