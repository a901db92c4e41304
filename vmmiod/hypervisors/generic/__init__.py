"""The hypervisor-agnostic IOREQ channel (docs/generic-ioreq.md)."""

from vmmiod.hypervisors.generic.adaptor import GenericAdaptor
from vmmiod.hypervisors.generic.lines import GenericLine

__all__ = ["GenericAdaptor", "GenericLine"]
