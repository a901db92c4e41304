"""Debian's Xen libraries through ctypes, loaded by soname, with their prototypes.

libxenctrl is avoided on purpose: its soname changes with every Xen release, while these six
keep a stable ABI. Every function gets explicit argtypes/restype (ctypes would otherwise pass
64-bit values as C int and truncate pointers). Errors come back as -1/NULL with errno set;
`check()` turns them into OSError with the function's name.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmmiod.hypervisors.base import PlatformUnavailable
from vmmiod.hypervisors.xen.abi import domid_t, evtchn_port_t, ioservid_t, xen_pfn_t

P = ctypes.c_void_p
U8, U16, U32, U64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
INT, UINT, SIZE, ULONG = ctypes.c_int, ctypes.c_uint, ctypes.c_size_t, ctypes.c_ulong
CHARP = ctypes.c_char_p
BOOL = ctypes.c_bool

# soname -> (attribute, Debian package that ships it)
SONAMES: dict[str, tuple[str, str]] = {
    "libxendevicemodel.so.1": ("dm", "libxendevicemodel1"),
    "libxenforeignmemory.so.1": ("fmem", "libxenforeignmemory1"),
    "libxenevtchn.so.1": ("evtchn", "libxenevtchn1"),
    "libxengnttab.so.1": ("gnttab", "libxengnttab1"),
    "libxentoolcore.so.1": ("toolcore", "libxentoolcore1"),
    "libxenstore.so.4": ("store", "libxenstore4"),
}

# (library attribute, function, restype, argtypes)
PROTOTYPES: list[tuple[str, str, Any, list[Any]]] = [
    # libxendevicemodel
    ("dm", "xendevicemodel_open", P, [P, UINT]),
    ("dm", "xendevicemodel_close", INT, [P]),
    ("dm", "xendevicemodel_nr_vcpus", INT, [P, domid_t, ctypes.POINTER(UINT)]),
    ("dm", "xendevicemodel_create_ioreq_server", INT,
     [P, domid_t, INT, ctypes.POINTER(ioservid_t)]),
    ("dm", "xendevicemodel_set_ioreq_server_state", INT, [P, domid_t, ioservid_t, INT]),
    ("dm", "xendevicemodel_destroy_ioreq_server", INT, [P, domid_t, ioservid_t]),
    ("dm", "xendevicemodel_map_io_range_to_ioreq_server", INT,
     [P, domid_t, ioservid_t, INT, U64, U64]),
    ("dm", "xendevicemodel_unmap_io_range_from_ioreq_server", INT,
     [P, domid_t, ioservid_t, INT, U64, U64]),
    ("dm", "xendevicemodel_set_irq_level", INT, [P, domid_t, UINT, UINT]),
    ("dm", "xendevicemodel_set_isa_irq_level", INT, [P, domid_t, U8, UINT]),
    ("dm", "xendevicemodel_inject_msi", INT, [P, domid_t, U64, U32]),
    # libxenevtchn
    ("evtchn", "xenevtchn_open", P, [P, UINT]),
    ("evtchn", "xenevtchn_close", INT, [P]),
    ("evtchn", "xenevtchn_fd", INT, [P]),
    ("evtchn", "xenevtchn_notify", INT, [P, evtchn_port_t]),
    ("evtchn", "xenevtchn_bind_interdomain", INT, [P, U32, evtchn_port_t]),
    ("evtchn", "xenevtchn_unbind", INT, [P, evtchn_port_t]),
    ("evtchn", "xenevtchn_pending", INT, [P]),
    ("evtchn", "xenevtchn_unmask", INT, [P, evtchn_port_t]),
    # libxenforeignmemory
    ("fmem", "xenforeignmemory_open", P, [P, UINT]),
    ("fmem", "xenforeignmemory_close", INT, [P]),
    ("fmem", "xenforeignmemory_map", P,
     [P, U32, INT, SIZE, ctypes.POINTER(xen_pfn_t), ctypes.POINTER(INT)]),
    ("fmem", "xenforeignmemory_unmap", INT, [P, P, SIZE]),
    ("fmem", "xenforeignmemory_map_resource", P,
     [P, domid_t, UINT, UINT, ULONG, ULONG, ctypes.POINTER(P), INT, INT]),
    ("fmem", "xenforeignmemory_unmap_resource", INT, [P, P]),
    # libxengnttab
    ("gnttab", "xengnttab_open", P, [P, UINT]),
    ("gnttab", "xengnttab_close", INT, [P]),
    ("gnttab", "xengnttab_map_domain_grant_refs", P,
     [P, U32, U32, ctypes.POINTER(U32), INT]),
    ("gnttab", "xengnttab_unmap", INT, [P, P, U32]),
    # libxentoolcore
    ("toolcore", "xentoolcore_restrict_all", INT, [domid_t]),
    # libxenstore
    ("store", "xs_open", P, [ULONG]),
    ("store", "xs_close", None, [P]),
    ("store", "xs_read", P, [P, U32, CHARP, ctypes.POINTER(UINT)]),
    ("store", "xs_write", BOOL, [P, U32, CHARP, CHARP, UINT]),
    ("store", "xs_directory", P, [P, U32, CHARP, ctypes.POINTER(UINT)]),
    ("store", "xs_watch", BOOL, [P, CHARP, CHARP]),
    ("store", "xs_unwatch", BOOL, [P, CHARP, CHARP]),
    ("store", "xs_fileno", INT, [P]),
    ("store", "xs_check_watch", P, [P]),
    ("store", "xs_is_domain_introduced", BOOL, [P, UINT]),
]

Loader = Callable[[str], Any]


def _default_loader(name: str) -> Any:
    return ctypes.CDLL(name, use_errno=True)


@dataclass
class XenLibs:
    dm: Any
    fmem: Any
    evtchn: Any
    gnttab: Any
    toolcore: Any
    store: Any
    libc: Any


def load_libraries(loader: Loader = _default_loader) -> XenLibs:
    """Load every library by soname; a missing one (or symbol) raises PlatformUnavailable."""
    found: dict[str, Any] = {}
    missing: list[tuple[str, str]] = []
    for soname, (attr, package) in SONAMES.items():
        try:
            found[attr] = loader(soname)
        except OSError:
            missing.append((soname, package))
    if missing:
        raise PlatformUnavailable(
            "Xen libraries not found: " + ", ".join(s for s, _p in missing)
            + ". Install them in dom0: apt-get install " + " ".join(p for _s, p in missing))
    for attr, name, restype, argtypes in PROTOTYPES:
        try:
            fn = getattr(found[attr], name)
        except AttributeError:
            raise PlatformUnavailable(
                f"{name} is missing from the installed Xen library ({attr}): Xen tools >= 4.15 "
                "are needed (Debian 12's libxen* 4.17 packages have everything)") from None
        fn.restype = restype
        fn.argtypes = argtypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.free.argtypes = [P]
    libc.free.restype = None
    return XenLibs(libc=libc, **found)


def check(rc: int, name: str) -> int:
    """Raise OSError(errno) when a C call returned a negative value."""
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return rc


def check_ptr(ptr: int | None, name: str) -> int:
    if not ptr:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ptr
