"""The Xen and Linux ABI the adaptor uses: constants and ctypes structures.

Values come from Xen's public headers (xen/include/public/hvm/ioreq.h, hvm/dm_op.h, memory.h,
io/xenbus.h) and Linux's include/uapi/xen/privcmd.h; tests/test_xen_abi.py checks each against
numbers computed independently (and against the C headers when a compiler and libxen-dev are
present). The ioreq_t codec itself lives in vmmiod/ioreq.py; only what the ctypes calls need is
here.
"""

from __future__ import annotations

import ctypes

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# C types of the library prototypes.
domid_t = ctypes.c_uint16
ioservid_t = ctypes.c_uint16
evtchn_port_t = ctypes.c_uint32
xen_pfn_t = ctypes.c_uint64  # unsigned long on x86-64, uint64_t on arm64: 8 bytes on both

DOMID_SELF = 0x7FF0
DOMID_FIRST_RESERVED = 0x7FF0  # domids at or above are not real guests

# XENMEM_acquire_resource (public/memory.h): the ioreq server's frames.
XENMEM_RESOURCE_IOREQ_SERVER = 0
IOREQ_SERVER_FRAME_BUFIOREQ = 0
IOREQ_SERVER_FRAME_IOREQ0 = 1  # XENMEM_resource_ioreq_server_frame_ioreq(0): the sync page

# xendevicemodel_create_ioreq_server(handle_bufioreq): HVM_IOREQSRV_BUFIOREQ_OFF. Arm has no
# buffered ring and refuses anything else with EINVAL.
HVM_IOREQSRV_BUFIOREQ_OFF = 0

# xendevicemodel_map_io_range_to_ioreq_server(is_mmio)
XEN_DMOP_IO_RANGE_PORT = 0
XEN_DMOP_IO_RANGE_MEMORY = 1

# struct xen_dm_op op codes used by the privcmd IRQFD fast path (the kernel issues the prepared
# dm_op itself, so we build the structure by hand).
XEN_DMOP_SET_ISA_IRQ_LEVEL = 9
XEN_DMOP_INJECT_MSI = 14
XEN_DMOP_SET_IRQ_LEVEL = 19
XEN_DMOP_NR_VCPUS = 20

# io/xenbus.h: enum xenbus_state
XENBUS_STATE_UNKNOWN = 0
XENBUS_STATE_INITIALISING = 1
XENBUS_STATE_INITWAIT = 2
XENBUS_STATE_INITIALISED = 3
XENBUS_STATE_CONNECTED = 4
XENBUS_STATE_CLOSING = 5
XENBUS_STATE_CLOSED = 6

# xenstore.h
XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1
XBT_NULL = 0

# Arm: shared peripheral interrupts start at 32; xl gives virtio-mmio devices SPIs 33..43.
ARM_FIRST_SPI = 32
ARM_GIC_MAX_IRQ = 1020
ISA_IRQ_MAX = 15
# x86 MSI: the fixed address window of the local APICs (Intel SDM 10.11.1), destination 0.
MSI_ADDRESS_BASE = 0xFEE0_0000
MSI_VECTOR_MIN = 16
MSI_VECTOR_MAX = 255


# -- one ioreq_t slot, for the fields the adaptor reads itself (vp_eport at bind time) -----------
class IoreqSlot(ctypes.LittleEndianStructure):
    """struct ioreq (public/hvm/ioreq.h); the flag bits share byte 30."""

    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("data", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("vp_eport", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),  # state:4, data_is_ptr:1, dir:1, df:1, pad:1
        ("type", ctypes.c_uint8),
    ]


IOREQ_SLOT_SIZE = ctypes.sizeof(IoreqSlot)
IOREQ_VP_EPORT_OFFSET = IoreqSlot.vp_eport.offset
MAX_VCPUS = PAGE_SIZE // IOREQ_SLOT_SIZE  # 128: the sync page holds one slot per vCPU


# -- struct xen_dm_op (public/hvm/dm_op.h) for the prepared IRQFD operation --------------------
class XenDmOpSetIrqLevel(ctypes.Structure):
    _fields_ = [("irq", ctypes.c_uint32), ("level", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class XenDmOpSetIsaIrqLevel(ctypes.Structure):
    _fields_ = [("isa_irq", ctypes.c_uint8), ("level", ctypes.c_uint8)]


class XenDmOpInjectMsi(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("addr", ctypes.c_uint64)]


class _XenDmOpUnion(ctypes.Union):
    # The real union's largest member (track_dirty_vram, modified_memory...) is 24 bytes; the
    # kernel copies only `size` bytes, so the members we use are enough.
    _fields_ = [("set_irq_level", XenDmOpSetIrqLevel),
                ("set_isa_irq_level", XenDmOpSetIsaIrqLevel),
                ("inject_msi", XenDmOpInjectMsi)]


class XenDmOp(ctypes.Structure):
    _fields_ = [("op", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("u", _XenDmOpUnion)]


# -- Linux privcmd (include/uapi/xen/privcmd.h, >= 6.7 with CONFIG_XEN_PRIVCMD_EVENTFD) ---------
class PrivcmdIrqfd(ctypes.Structure):
    _fields_ = [
        ("dm_op", ctypes.c_uint64),  # user pointer to a struct xen_dm_op
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dom", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 2),
    ]


class PrivcmdIoeventfd(ctypes.Structure):
    _fields_ = [
        ("ioreq", ctypes.c_uint64),  # user pointer to the mapped sync ioreq page
        ("ports", ctypes.c_uint64),  # user pointer to u32[vcpus] local event-channel ports
        ("addr", ctypes.c_uint64),  # guest address of QueueNotify
        ("addr_len", ctypes.c_uint32),
        ("event_fd", ctypes.c_uint32),
        ("vcpus", ctypes.c_uint32),
        ("vq", ctypes.c_uint32),  # the queue index the write must carry
        ("flags", ctypes.c_uint32),
        ("dom", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 2),
    ]


PRIVCMD_IRQFD_FLAG_DEASSIGN = 1
PRIVCMD_IOEVENTFD_FLAG_DEASSIGN = 1

# asm-generic/ioctl.h encoding (x86-64 and arm64 share it).
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1


def ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return ((direction << _IOC_DIRSHIFT) | (ord(kind) << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


# IRQFD was first defined with _IOC_NONE and fixed to _IOW before 6.7 shipped; IOEVENTFD is _IOW.
IOCTL_PRIVCMD_IRQFD = ioc(_IOC_WRITE, "P", 8, ctypes.sizeof(PrivcmdIrqfd))
IOCTL_PRIVCMD_IOEVENTFD = ioc(_IOC_WRITE, "P", 9, ctypes.sizeof(PrivcmdIoeventfd))

# virtio-mmio QueueNotify, for IOEVENTFD registration (VIRTIO 1.2, 4.2.2).
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
