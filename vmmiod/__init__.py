"""vmmiod: a virtio-mmio device-backend daemon."""

__version__ = "0.1.0"
