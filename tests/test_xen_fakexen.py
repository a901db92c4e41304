"""A Xen the size of a test: the six libraries' functions over an in-process model.

Handed to XenAdaptor through its `loader` argument (dependency injection), so the adaptor's own
code runs unchanged: pointers are real (xenstore strings are malloc'd and freed by the adaptor
with libc's free; the ioreq page is real memory), fds are real pipes served by the real event
loop, errno travels through ctypes' errno like the libraries' does. Only what the hypervisor,
xenstored and the kernel would do is modelled. No test lives here.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]


def _fail(err: int, value: Any = -1) -> Any:
    ctypes.set_errno(err)
    return value


def _block(strings: list[bytes]) -> int:
    """One malloc'd block: char *[n] followed by the strings (what libxenstore returns)."""
    ptrs = len(strings) * 8
    total = ptrs + sum(len(s) + 1 for s in strings)
    p = libc.malloc(total)
    arr = (ctypes.c_void_p * len(strings)).from_address(p)
    at = p + ptrs
    for i, s in enumerate(strings):
        ctypes.memmove(at, s + b"\0", len(s) + 1)
        arr[i] = at
        at += len(s) + 1
    return int(p)


@dataclass
class XsConn:
    rfd: int
    wfd: int
    events: deque[tuple[str, str]] = field(default_factory=deque)
    watches: list[tuple[str, str]] = field(default_factory=list)


class FakeXen:
    def __init__(self, domains: dict[int, str] | None = None, nr_vcpus: int = 2,
                 missing: tuple[str, ...] = ()) -> None:
        self.domains = dict(domains or {})
        self.nr_vcpus_value = nr_vcpus
        self.missing = missing
        self.dm_errno: int | None = None
        self.store: dict[str, str] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.xs: dict[int, XsConn] = {}
        self._next = 100
        self.page = (ctypes.c_char * PAGE)()
        self.server_enabled = False
        self.servers: set[int] = set()  # IOREQ servers that exist (ids)
        self.ranges: list[tuple[int, int]] = []
        self.local_ports: dict[int, int] = {}  # local -> remote
        self.evq: deque[int] = deque()
        self.ev_r, self.ev_w = os.pipe()
        self.irqs: list[tuple[str, int, int]] = []
        self.notified: list[int] = []
        self.restricted_with_open_xs: int | None = None
        self.ns = self._namespace()

    # -- what tests do to the model ----------------------------------------------------------------
    def loader(self, soname: str) -> Any:
        if soname in self.missing:
            raise OSError(f"{soname}: cannot open shared object file")
        return self.ns

    def add_backend(self, kind: str, domid: int, devid: int, base: str, irq: int,
                    state: int = 1, grant_usage: int | None = None) -> str:
        path = f"/local/domain/0/backend/{kind}/{domid}/{devid}"
        self.store[f"{path}/base"] = base
        self.store[f"{path}/irq"] = str(irq)
        self.store[f"{path}/frontend-id"] = str(domid)
        self.store[f"{path}/frontend"] = f"/local/domain/{domid}/device/{kind}/{devid}"
        if grant_usage is not None:
            self.store[f"{path}/grant_usage"] = str(grant_usage)
        self._set(f"{path}/state", str(state))
        return path

    def add_domain(self, domid: int, name: str) -> None:
        self.domains[domid] = name
        self._set(f"/local/domain/{domid}/name", name)

    def name_domain(self, domid: int, name: str) -> None:
        """What libxl does first: the domain exists and is named, not yet introduced to
        xenstored (xs_is_domain_introduced says no until introduce())."""
        self._set(f"/local/domain/{domid}/name", name)

    def introduce(self, domid: int, name: str) -> None:
        self.domains[domid] = name
        self._fire("@introduceDomain")

    def fire_release(self) -> None:
        """@releaseDomain fires for some other reason (another domain, a shutdown)."""
        self._fire("@releaseDomain")

    def toolstack_write(self, path: str, value: str) -> None:
        self._set(path, value)

    def remove_entry(self, path: str) -> None:
        """The toolstack's xs_rm of a whole backend directory (one operation)."""
        for key in [k for k in self.store if k.startswith(path + "/")]:
            del self.store[key]
        self._fire(path)

    def destroy_domain(self, domid: int) -> None:
        self.domains.pop(domid, None)
        for key in [k for k in self.store if k.startswith(f"/local/domain/{domid}/")
                    or f"/{domid}/" in k]:
            del self.store[key]
        self._fire("@releaseDomain")

    def guest_access(self, vcpu: int, addr: int, size: int, write: bool, data: int = 0) -> None:
        """The guest's vCPU touches a window: Xen fills the slot and signals the port."""
        import struct

        flags = 1 | (0 if write else 1 << 5)  # READY, dir
        eport = 200 + vcpu
        struct.pack_into("<QQIIIHBB", self.page, vcpu * 32, addr, data, 1, size, eport, 0,
                         flags, 1)
        for local, remote in self.local_ports.items():
            if remote == eport:
                self.evq.append(local)
                os.write(self.ev_w, b"e")

    def slot(self, vcpu: int) -> tuple[int, int]:
        """(state, data) of a slot."""
        raw = bytes(self.page[vcpu * 32: vcpu * 32 + 32])
        return raw[30] & 0xF, int.from_bytes(raw[8:16], "little")

    # -- internals ---------------------------------------------------------------------------------
    def _handle(self) -> int:
        self._next += 1
        return self._next

    def _set(self, path: str, value: str) -> None:
        self.store[path] = value
        self._fire(path)

    def _fire(self, path: str) -> None:
        for conn in self.xs.values():
            for wpath, token in conn.watches:
                if path == wpath or path.startswith(wpath + "/"):
                    conn.events.append((path, token))
                    os.write(conn.wfd, b"w")

    def _namespace(self) -> Any:
        x = self
        fns: dict[str, Callable[..., Any]] = {}

        def fn(f: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any) -> Any:
                x.calls.append((f.__name__, *args))
                return f(*args)
            wrapper.__name__ = f.__name__
            fns[f.__name__] = wrapper
            return wrapper

        # libxendevicemodel
        @fn
        def xendevicemodel_open(_logger: Any, _flags: int) -> int:
            return x._handle()

        @fn
        def xendevicemodel_close(_h: int) -> int:
            return 0

        @fn
        def xendevicemodel_nr_vcpus(_h: int, domid: int, out: Any) -> int:
            if x.dm_errno is not None:
                return _fail(x.dm_errno)
            if domid not in x.domains:
                return _fail(errno.ESRCH)
            out._obj.value = x.nr_vcpus_value
            return 0

        @fn
        def xendevicemodel_create_ioreq_server(_h: int, domid: int, bufioreq: int,
                                               out: Any) -> int:
            if bufioreq != 0:
                return _fail(errno.EINVAL)  # what Arm says
            sid = 3 if 3 not in x.servers else max(x.servers) + 1
            x.servers.add(sid)
            out._obj.value = sid
            return 0

        @fn
        def xendevicemodel_set_ioreq_server_state(_h: int, domid: int, sid: int,
                                                  enabled: int) -> int:
            x.server_enabled = bool(enabled)
            if enabled:
                for v in range(x.nr_vcpus_value):
                    ctypes.memmove(ctypes.addressof(x.page) + v * 32 + 24,
                                   (200 + v).to_bytes(4, "little"), 4)
            return 0

        @fn
        def xendevicemodel_destroy_ioreq_server(_h: int, domid: int, sid: int) -> int:
            if sid not in x.servers:
                return _fail(errno.ENOENT)
            x.servers.discard(sid)
            x.ranges.clear()
            x.server_enabled = False
            return 0

        @fn
        def xendevicemodel_map_io_range_to_ioreq_server(_h: int, domid: int, sid: int,
                                                        is_mmio: int, start: int,
                                                        end: int) -> int:
            if (start, end) in x.ranges:
                return _fail(errno.EEXIST)  # Xen: the range overlaps one already mapped
            x.ranges.append((start, end))
            return 0

        @fn
        def xendevicemodel_unmap_io_range_from_ioreq_server(*_a: Any) -> int:
            return 0

        @fn
        def xendevicemodel_set_irq_level(_h: int, domid: int, irq: int, level: int) -> int:
            x.irqs.append(("spi", irq, level))
            return 0

        @fn
        def xendevicemodel_set_isa_irq_level(_h: int, domid: int, irq: int, level: int) -> int:
            x.irqs.append(("isa", irq, level))
            return 0

        @fn
        def xendevicemodel_inject_msi(_h: int, domid: int, addr: int, data: int) -> int:
            x.irqs.append(("msi", addr, data))
            return 0

        # libxenevtchn
        @fn
        def xenevtchn_open(_logger: Any, _flags: int) -> int:
            return x._handle()

        @fn
        def xenevtchn_close(_h: int) -> int:
            return 0

        @fn
        def xenevtchn_fd(_h: int) -> int:
            return x.ev_r

        @fn
        def xenevtchn_notify(_h: int, port: int) -> int:
            x.notified.append(port)
            return 0

        @fn
        def xenevtchn_bind_interdomain(_h: int, domid: int, remote: int) -> int:
            local = 10 + len(x.local_ports)
            x.local_ports[local] = remote
            return local

        @fn
        def xenevtchn_unbind(_h: int, port: int) -> int:
            x.local_ports.pop(port, None)
            return 0

        @fn
        def xenevtchn_pending(_h: int) -> int:
            if not x.evq:
                return _fail(errno.EAGAIN)
            os.read(x.ev_r, 1)
            return x.evq.popleft()

        @fn
        def xenevtchn_unmask(_h: int, port: int) -> int:
            return 0

        # libxenforeignmemory
        @fn
        def xenforeignmemory_open(_logger: Any, _flags: int) -> int:
            return x._handle()

        @fn
        def xenforeignmemory_close(_h: int) -> int:
            return 0

        @fn
        def xenforeignmemory_map(*_a: Any) -> Any:
            return _fail(errno.EINVAL, None)

        @fn
        def xenforeignmemory_unmap(*_a: Any) -> int:
            return 0

        @fn
        def xenforeignmemory_map_resource(_h: int, domid: int, typ: int, sid: int, frame: int,
                                          nr: int, paddr: Any, prot: int, flags: int) -> Any:
            if (typ, frame, nr) != (0, 1, 1):
                return _fail(errno.EINVAL, None)
            if sid not in x.servers:
                return _fail(errno.ENOENT, None)
            paddr._obj.value = ctypes.addressof(x.page)
            return 77

        @fn
        def xenforeignmemory_unmap_resource(_h: int, res: int) -> int:
            return 0

        # libxengnttab
        @fn
        def xengnttab_open(_logger: Any, _flags: int) -> int:
            return x._handle()

        @fn
        def xengnttab_close(_h: int) -> int:
            return 0

        @fn
        def xengnttab_map_domain_grant_refs(*_a: Any) -> Any:
            return _fail(errno.EINVAL, None)

        @fn
        def xengnttab_unmap(*_a: Any) -> int:
            return 0

        # libxentoolcore
        @fn
        def xentoolcore_restrict_all(domid: int) -> int:
            x.restricted_with_open_xs = len(x.xs)
            return 0

        # libxenstore
        @fn
        def xs_open(_flags: int) -> int:
            h = x._handle()
            r, w = os.pipe()
            x.xs[h] = XsConn(r, w)
            return h

        def conn_of(h: int) -> XsConn:
            # libxenstore dereferences the handle: a closed or NULL one crashes the daemon.
            if h not in x.xs:
                raise AssertionError(f"xenstore call on a closed handle {h!r} (would crash)")
            return x.xs[h]

        @fn
        def xs_close(h: int) -> None:
            conn = x.xs.pop(h, None)
            if conn is not None:
                os.close(conn.rfd)
                os.close(conn.wfd)

        @fn
        def xs_read(h: int, _t: int, path: bytes, length: Any) -> Any:
            conn_of(h)
            value = x.store.get(path.decode())
            if value is None:
                return _fail(errno.ENOENT, None)
            data = value.encode()
            p = libc.malloc(len(data) + 1)
            ctypes.memmove(p, data + b"\0", len(data) + 1)
            length._obj.value = len(data)
            return p

        @fn
        def xs_write(h: int, _t: int, path: bytes, data: bytes, n: int) -> bool:
            conn_of(h)
            x._set(path.decode(), data[:n].decode())
            return True

        @fn
        def xs_directory(h: int, _t: int, path: bytes, num: Any) -> Any:
            conn_of(h)
            prefix = path.decode().rstrip("/") + "/"
            names = sorted({k[len(prefix):].split("/")[0] for k in x.store
                            if k.startswith(prefix)})
            if not names:
                return _fail(errno.ENOENT, None)
            num._obj.value = len(names)
            return _block([n.encode() for n in names])

        @fn
        def xs_watch(h: int, path: bytes, token: bytes) -> bool:
            conn = conn_of(h)
            conn.watches.append((path.decode(), token.decode()))
            conn.events.append((path.decode(), token.decode()))  # xenstored fires at once
            os.write(conn.wfd, b"w")
            return True

        @fn
        def xs_unwatch(h: int, path: bytes, token: bytes) -> bool:
            conn_of(h)
            return True

        @fn
        def xs_fileno(h: int) -> int:
            return conn_of(h).rfd

        @fn
        def xs_check_watch(h: int) -> Any:
            conn = conn_of(h)
            if not conn.events:
                return _fail(errno.EAGAIN, None)
            os.read(conn.rfd, 1)
            path, token = conn.events.popleft()
            return _block([path.encode(), token.encode()])

        @fn
        def xs_is_domain_introduced(h: int, domid: int) -> bool:
            conn_of(h)
            return domid in x.domains

        class Lib:
            pass

        lib = Lib()
        for name, f in fns.items():
            setattr(lib, name, f)
        return lib

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]
