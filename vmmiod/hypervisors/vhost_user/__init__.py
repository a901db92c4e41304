"""The vhost-user back-end adaptor (docs/vhost-user.md): QEMU, cloud-hypervisor and other VMMs
drive vmmiod's devices over one vhost-user socket per device."""

from vmmiod.hypervisors.vhost_user.adaptor import VhostUserAdaptor

__all__ = ["VhostUserAdaptor"]
