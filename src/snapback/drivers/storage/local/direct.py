"""Read-only access to a qcow2 chain that reads data clusters straight from the files.

``qemu-img map`` tells, for every range of the guest-visible disk, which file
of the chain holds it and at which offset; the reader then serves each read
with ``os.preadv`` on that file, straight into the caller's buffer — no
qemu-nbd process, no socket copy, and the GIL is released while the kernel
copies. Ranges that read as zeroes cost nothing; compressed clusters (no
offset) go through a read-only qemu-nbd export, opened only if such a range is
read.

Only for files that do not change while the handle is open: a snapshot's
layers, or a stopped volume's head under its volume lock (a backup). Files the
project did not make are never opened here (imports are inspected first), and
a chain using an external data file is read through qemu-nbd instead.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from typing import Any

from snapback.domain.errors import StorageError
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.storage.base import BlockHandle
from snapback.drivers.storage.nbd import NbdHandle

DIRECT_FORMATS = ("qcow2", "raw")
_ZEROES = memoryview(bytes(4 << 20))  # sliced without a copy


def open_read_only(path: str) -> BlockHandle:
    """A read-only handle on the chain ending in ``path``: mapped when every file keeps
    its data in itself (qcow2 or raw, no external data file, not encrypted), else
    through qemu-nbd."""
    chain: list[dict[str, Any]] = qemu_img.info(path, "qcow2", chain=True)["chain"]
    for row in chain:
        data = row.get("format-specific", {}).get("data", {})
        if row.get("format") not in DIRECT_FORMATS or data.get("data-file") or data.get("encrypt"):
            return NbdHandle(path, read_only=True)
    return MappedReader(path, chain)


class MappedReader(BlockHandle):
    parallel_reads = True  # preadv on shared descriptors; the map is not changed after open

    def __init__(self, path: str, chain: list[dict[str, Any]]) -> None:
        self._path = path
        self._size = int(chain[0]["virtual-size"])
        self._extents = qemu_img.map_extents(path, "qcow2")
        self._starts = [e.start for e in self._extents]
        self._fds: list[int] = []
        self._nbd: NbdHandle | None = None
        self._nbd_lock = threading.Lock()
        try:
            for row in chain:
                self._fds.append(os.open(str(row["filename"]), os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot open the layers of {path}: {exc.strerror}") from exc

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` piece by piece: ``preadv`` straight into it for data, zeroes
        for holes, QEMU for compressed clusters."""
        length = len(buf)
        if offset < 0 or offset + length > self._size:
            raise StorageError(
                f"range {offset}+{length} lies outside the volume ({self._size} bytes)"
            )
        view = memoryview(buf)
        pos, end = offset, offset + length
        i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        while pos < end:
            if i >= len(self._extents):
                raise StorageError(f"{self._path}: no map entry for offset {pos}")
            e = self._extents[i]
            n = min(end, e.start + e.length) - pos
            if n > 0:
                self._piece(e, pos, view[pos - offset : pos - offset + n])
                pos += n
            i += 1

    def _piece(self, e: qemu_img.Extent, pos: int, out: memoryview) -> None:
        n = len(out)
        if not e.data:
            for at in range(0, n, len(_ZEROES)):
                piece = min(n - at, len(_ZEROES))
                out[at : at + piece] = _ZEROES[:piece]
            return
        if e.offset is None:  # compressed: only QEMU can read it
            with self._nbd_lock:
                if self._nbd is None:
                    self._nbd = NbdHandle(self._path, read_only=True)
            out[:] = self._nbd.read(pos, n)
            return
        if e.depth >= len(self._fds):
            raise StorageError(f"{self._path}: map names layer {e.depth} of {len(self._fds)}")
        try:
            got = os.preadv(self._fds[e.depth], [out], e.offset + (pos - e.start))
        except OSError as exc:
            raise StorageError(f"read failed at {pos} of {self._path}: {exc.strerror}") from exc
        if got != n:
            raise StorageError(f"{self._path}: layer {e.depth} is shorter than its map says")

    def write(self, offset: int, data: bytes) -> None:
        raise StorageError("this handle is read-only")

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        if self._nbd is not None:
            self._nbd.close()
            self._nbd = None
