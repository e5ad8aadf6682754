"""The narrow byte-level interface every repository backend offers.

Keys are ``/``-separated paths of ``[A-Za-z0-9._-]`` segments chosen by the
repository (never by a user). Values are whole objects of at most a few MiB.
Objects are written once: ``put`` never replaces an existing object unless
asked (``overwrite``), and a reader sees either nothing or the whole object.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from snapback.domain.errors import InvalidInput, StorageError

_KEY = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class BackendError(StorageError):
    """The store failed (I/O error, network, refused request)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch: when it was written or last touched


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/"):
        raise InvalidInput(f"invalid repository key {key!r}")
    return key


class Backend(abc.ABC):
    """One repository's objects."""

    url: str

    def prepare(self) -> None:
        """Make the place the objects go (``repo init``): a bucket that is missing."""
        return None  # a folder is made by its first put

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        """Store ``data`` under ``key`` atomically and durably.

        Returns False (and stores nothing) when the key exists and ``overwrite``
        is False; True when written.
        """

    def put_parts(self, key: str, parts: Sequence[bytes], *, overwrite: bool = False) -> bool:
        """``put`` of the parts' concatenation. A backend that can write the parts
        without joining them first (a folder: straight into its aligned buffer)
        overrides this and saves a copy of every chunk."""
        return self.put(key, b"".join(parts), overwrite=overwrite)

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; NotFound when it does not exist."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and mtime, or None when it does not exist."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing one is fine."""

    @abc.abstractmethod
    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a folder, ending in ``/``, or empty)."""

    @abc.abstractmethod
    def touch(self, key: str) -> None:
        """Refresh the object's mtime (gc's grace window counts from it); NotFound if missing."""

    def prefetch(self, key: str) -> None:
        """A hint that ``key`` will be read soon; a store that can starts reading it."""
        return None

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None
