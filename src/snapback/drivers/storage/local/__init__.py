"""The ``local`` pool driver: volumes as chains of qcow2 layer files (see docs/local-pool.md)."""

from snapback.drivers.storage.local.pool import LocalPool

__all__ = ["LocalPool"]
