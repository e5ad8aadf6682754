"""Byte access to an RBD image (or one of its snapshots) through librbd."""

from __future__ import annotations

import time
from typing import Any

from snapback.domain.errors import StorageError
from snapback.drivers.storage.base import BlockHandle
from snapback.drivers.storage.rbd import closing
from snapback.drivers.storage.rbd.cluster import translated

MAX_REQUEST = 64 << 20
# Read-only handles take reads from several threads; False: one reader, in disk
# order (bench/rbd_backup.py compares the two).
PARALLEL_READS = True


class RbdHandle(BlockHandle):
    """One open image. A read-only one takes reads from several threads at once:
    librbd serves concurrent I/O on one image, and the binding releases the GIL
    around each ``rbd_read2``, so backup workers each wait on their own OSD requests."""

    def __init__(self, image: Any, what: str, key: tuple[str, ...], read_only: bool) -> None:
        self._img, self._what, self._key, self._read_only = image, what, key, read_only
        self.parallel_reads = read_only and PARALLEL_READS
        self._opened = time.monotonic()
        with translated(what):
            self._size = int(image.size())

    @property
    def image(self) -> Any:
        """The ``rbd.Image`` itself, for the driver's own calls."""
        return self._img

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        with translated(self._what):
            if length <= MAX_REQUEST:
                return bytes(self._img.read(offset, length))
            out = bytearray()
            for off in range(offset, offset + length, MAX_REQUEST):
                out += self._img.read(off, min(MAX_REQUEST, offset + length - off))
        return bytes(out)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        data = self.read(offset, len(buf))
        if len(data) != len(buf):
            raise StorageError(
                f"short read from {self._what}: {len(data)} of {len(buf)} bytes at {offset}"
            )
        buf[:] = data

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        with translated(self._what):
            for pos in range(0, len(data), MAX_REQUEST):
                chunk = bytes(view[pos : pos + MAX_REQUEST])
                written = self._img.write(chunk, offset + pos)
                if written != len(chunk):
                    raise OSError(f"short write to {self._what}")

    def close(self) -> None:
        # not at once: see closing.py
        closing.close(self._img, self._opened, self._key, read_only=self._read_only)
