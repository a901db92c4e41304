"""Thin, typed wrappers over the library handles: device model, event channels, foreign memory,
grant table. Each call checks its result and raises OSError with errno; nothing here decides
policy (that is server.py's and adaptor.py's job).
"""

from __future__ import annotations

import ctypes
import errno
import os

from vmmiod.hypervisors.xen.abi import (
    HVM_IOREQSRV_BUFIOREQ_OFF,
    IOREQ_SERVER_FRAME_IOREQ0,
    PAGE_SIZE,
    XENMEM_RESOURCE_IOREQ_SERVER,
    ioservid_t,
    xen_pfn_t,
)
from vmmiod.hypervisors.xen.libs import XenLibs, check, check_ptr

PROT_READ = 0x1
PROT_WRITE = 0x2


class DeviceModel:
    """libxendevicemodel: the dm_op hypercalls for one guest."""

    def __init__(self, libs: XenLibs, domid: int) -> None:
        self._lib = libs.dm
        self.domid = domid
        self.handle = check_ptr(self._lib.xendevicemodel_open(None, 0), "xendevicemodel_open")

    def nr_vcpus(self) -> int:
        n = ctypes.c_uint(0)
        check(self._lib.xendevicemodel_nr_vcpus(self.handle, self.domid, ctypes.byref(n)),
              "xendevicemodel_nr_vcpus")
        return n.value

    def create_ioreq_server(self) -> int:
        sid = ioservid_t(0)
        check(self._lib.xendevicemodel_create_ioreq_server(
            self.handle, self.domid, HVM_IOREQSRV_BUFIOREQ_OFF, ctypes.byref(sid)),
            "xendevicemodel_create_ioreq_server")
        return sid.value

    def set_ioreq_server_state(self, sid: int, enabled: bool) -> None:
        check(self._lib.xendevicemodel_set_ioreq_server_state(
            self.handle, self.domid, sid, 1 if enabled else 0),
            "xendevicemodel_set_ioreq_server_state")

    def destroy_ioreq_server(self, sid: int) -> None:
        check(self._lib.xendevicemodel_destroy_ioreq_server(self.handle, self.domid, sid),
              "xendevicemodel_destroy_ioreq_server")

    def map_mmio_range(self, sid: int, start: int, end_inclusive: int) -> None:
        check(self._lib.xendevicemodel_map_io_range_to_ioreq_server(
            self.handle, self.domid, sid, 1, start, end_inclusive),
            "xendevicemodel_map_io_range_to_ioreq_server")

    def unmap_mmio_range(self, sid: int, start: int, end_inclusive: int) -> None:
        check(self._lib.xendevicemodel_unmap_io_range_from_ioreq_server(
            self.handle, self.domid, sid, 1, start, end_inclusive),
            "xendevicemodel_unmap_io_range_from_ioreq_server")

    def set_irq_level(self, irq: int, level: int) -> None:
        check(self._lib.xendevicemodel_set_irq_level(self.handle, self.domid, irq, level),
              "xendevicemodel_set_irq_level")

    def set_isa_irq_level(self, irq: int, level: int) -> None:
        check(self._lib.xendevicemodel_set_isa_irq_level(self.handle, self.domid, irq, level),
              "xendevicemodel_set_isa_irq_level")

    def inject_msi(self, addr: int, data: int) -> None:
        check(self._lib.xendevicemodel_inject_msi(self.handle, self.domid, addr, data),
              "xendevicemodel_inject_msi")

    def close(self) -> None:
        if self.handle:
            self._lib.xendevicemodel_close(self.handle)
            self.handle = 0


class EventChannels:
    """libxenevtchn: one handle, every vCPU's port bound on it, its fd served by the loop."""

    def __init__(self, libs: XenLibs) -> None:
        self._lib = libs.evtchn
        self.handle = check_ptr(self._lib.xenevtchn_open(None, 0), "xenevtchn_open")
        self.fd: int = check(self._lib.xenevtchn_fd(self.handle), "xenevtchn_fd")
        # pending() reads the fd: non-blocking so that draining it ends with EAGAIN.
        os.set_blocking(self.fd, False)

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        return check(self._lib.xenevtchn_bind_interdomain(self.handle, domid, remote_port),
                     "xenevtchn_bind_interdomain")

    def unbind(self, port: int) -> None:
        check(self._lib.xenevtchn_unbind(self.handle, port), "xenevtchn_unbind")

    def pending(self) -> int | None:
        """The next port that fired, or None when there is none right now."""
        port: int = self._lib.xenevtchn_pending(self.handle)
        if port < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return None
            raise OSError(err, f"xenevtchn_pending: {os.strerror(err)}")
        return port

    def unmask(self, port: int) -> None:
        check(self._lib.xenevtchn_unmask(self.handle, port), "xenevtchn_unmask")

    def notify(self, port: int) -> None:
        check(self._lib.xenevtchn_notify(self.handle, port), "xenevtchn_notify")

    def close(self) -> None:
        if self.handle:
            self._lib.xenevtchn_close(self.handle)
            self.handle = 0


class ForeignMemory:
    """libxenforeignmemory: the ioreq server's page and guest frames."""

    def __init__(self, libs: XenLibs) -> None:
        self._lib = libs.fmem
        self.handle = check_ptr(self._lib.xenforeignmemory_open(None, 0),
                                "xenforeignmemory_open")

    def map_ioreq_page(self, domid: int, sid: int) -> tuple[int, int]:
        """Map the synchronous ioreq page (frame 1). Returns (resource handle, address)."""
        addr = ctypes.c_void_p(0)
        res = self._lib.xenforeignmemory_map_resource(
            self.handle, domid, XENMEM_RESOURCE_IOREQ_SERVER, sid, IOREQ_SERVER_FRAME_IOREQ0, 1,
            ctypes.byref(addr), PROT_READ | PROT_WRITE, 0)
        check_ptr(res, "xenforeignmemory_map_resource")
        return res, check_ptr(addr.value, "xenforeignmemory_map_resource")

    def unmap_resource(self, res: int) -> None:
        check(self._lib.xenforeignmemory_unmap_resource(self.handle, res),
              "xenforeignmemory_unmap_resource")

    def map(self, domid: int, first_gfn: int, pages: int, prot: int) -> tuple[int, list[int]]:
        """Map `pages` consecutive guest frames. Returns (address, per-page errno list).

        A page with a non-zero error is NOT usable (touching it faults); the caller must hand
        out views only over pages whose error is 0.
        """
        gfns = (xen_pfn_t * pages)(*range(first_gfn, first_gfn + pages))
        errs = (ctypes.c_int * pages)()
        addr = self._lib.xenforeignmemory_map(self.handle, domid, prot, pages, gfns, errs)
        return check_ptr(addr, "xenforeignmemory_map"), [abs(e) for e in errs]

    def unmap(self, addr: int, pages: int) -> None:
        check(self._lib.xenforeignmemory_unmap(self.handle, addr, pages),
              "xenforeignmemory_unmap")

    def close(self) -> None:
        if self.handle:
            self._lib.xenforeignmemory_close(self.handle)
            self.handle = 0


class GrantTable:
    """libxengnttab: consecutive grant references of the guest, mapped as one range."""

    def __init__(self, libs: XenLibs) -> None:
        self._lib = libs.gnttab
        self.handle = check_ptr(self._lib.xengnttab_open(None, 0), "xengnttab_open")

    def map_refs(self, domid: int, first_ref: int, count: int, prot: int) -> int:
        refs = (ctypes.c_uint32 * count)(*range(first_ref, first_ref + count))
        return check_ptr(self._lib.xengnttab_map_domain_grant_refs(
            self.handle, count, domid, refs, prot), "xengnttab_map_domain_grant_refs")

    def unmap(self, addr: int, count: int) -> None:
        check(self._lib.xengnttab_unmap(self.handle, addr, count), "xengnttab_unmap")

    def close(self) -> None:
        if self.handle:
            self._lib.xengnttab_close(self.handle)
            self.handle = 0


def page_view(addr: int, size: int = PAGE_SIZE) -> memoryview:
    """A writable byte memoryview over `size` bytes of mapped memory at `addr`."""
    return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
