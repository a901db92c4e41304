"""The Xen adaptor: vmmiod as a Xen IOREQ server (see docs/xen.md)."""

from vmmiod.hypervisors.xen.adaptor import BackendMismatch, XenAdaptor

__all__ = ["BackendMismatch", "XenAdaptor"]
