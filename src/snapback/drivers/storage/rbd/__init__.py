"""The ``rbd`` pool driver: volumes as Ceph RBD images (see docs/rbd-pool.md)."""

from snapback.drivers.storage.rbd.pool import RbdPool

__all__ = ["RbdPool"]
