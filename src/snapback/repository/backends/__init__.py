"""Byte-level stores behind one narrow interface (filesystem folder, S3)."""

from snapback.repository.backends.base import Backend, BackendError, ObjectInfo

__all__ = ["Backend", "BackendError", "ObjectInfo"]
