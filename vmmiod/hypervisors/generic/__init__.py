"""The hypervisor-agnostic IOREQ channel (docs/generic-ioreq.md)."""

from vmmiod.hypervisors.generic.adaptor import GenericAdaptor, GenericLine

__all__ = ["GenericAdaptor", "GenericLine"]
