"""Read-only access to a qcow2 chain that reads data clusters straight from the files.

``qemu-img map`` tells, for every range of the guest-visible disk, which file
of the chain holds it and at which offset; the reader then serves each read
with ``os.preadv`` on that file, straight into the caller's buffer — no
qemu-nbd process, no socket copy, and the GIL is released while the kernel
copies. Ranges that read as zeroes cost nothing; compressed clusters (no
offset) go through a read-only qemu-nbd export, opened only if such a range is
read.

Only for files whose data does not change while the handle is open: a
snapshot's layers, or a stopped volume's head under its volume lock (a backup).
The one write allowed meanwhile is QEMU adding a dirty bitmap to that head
(``tracking.open_tracking``): it writes the header, the bitmap directory and
refcounts, in clusters no L1 or L2 entry names, and the reader took the header
and the L1 table at open and reads L2 tables and data clusters only. Files the
project did not make are never opened here (imports are inspected first), and
a chain using an external data file is read through qemu-nbd instead.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

from snapback.domain.errors import StorageError
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.imagefmt.qcow2_header import Unreadable
from snapback.drivers.imagefmt.qcow2_map import Qcow2Chain
from snapback.drivers.storage.base import BlockHandle
from snapback.drivers.storage.nbd import NbdHandle

DIRECT_FORMATS = ("qcow2", "raw")
_ZEROES = memoryview(bytes(4 << 20))  # sliced without a copy


def open_mapped(path: str, before_qemu: Callable[[], None] | None = None) -> MappedReader | None:
    """The chain ending in ``path`` mapped from the files' own tables (``qcow2_map``);
    None when that reader has a doubt. ``before_qemu`` runs before the handle first
    starts QEMU (compressed clusters)."""
    try:
        chain = Qcow2Chain(path)
    except (Unreadable, UnicodeDecodeError, struct.error, OSError):
        return None  # by design: a doubt of our reader is answered by QEMU, never a guess
    return MappedReader(path, chain.size, chain.fds, chain.extents, chain.close, before_qemu)


def open_read_only(path: str) -> BlockHandle:
    """A read-only handle on the chain ending in ``path``: mapped when every file keeps
    its data in itself (qcow2 or raw, no external data file, not encrypted), else
    through qemu-nbd. The map comes from the files' own tables, or from QEMU when
    our reader has a doubt."""
    mapped = open_mapped(path)
    if mapped is not None:
        return mapped
    rows: list[dict[str, Any]] = qemu_img.info(path, "qcow2", chain=True)["chain"]
    for row in rows:
        data = row.get("format-specific", {}).get("data", {})
        if row.get("format") not in DIRECT_FORMATS or data.get("data-file") or data.get("encrypt"):
            return NbdHandle(path, read_only=True)
    listed = _Listed(qemu_img.map_extents(path, "qcow2"))
    fds: list[int] = []
    try:
        for row in rows:
            fds.append(os.open(str(row["filename"]), os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        _close_all(fds)
        raise StorageError(f"cannot open the layers of {path}: {exc.strerror}") from exc
    return MappedReader(path, int(rows[0]["virtual-size"]), fds, listed, lambda: _close_all(fds))


class _Listed:
    """Extents looked up in ``qemu-img map``'s list for the whole disk."""

    def __init__(self, extents: list[qemu_img.Extent]) -> None:
        self._extents = extents
        self._starts = [e.start for e in extents]

    def __call__(self, start: int, length: int) -> list[qemu_img.Extent]:
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        j = bisect.bisect_left(self._starts, start + length)
        return self._extents[i:j]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class MappedReader(BlockHandle):
    parallel_reads = True  # preadv on shared descriptors; the map is not changed after open

    def __init__(
        self,
        path: str,
        size: int,
        fds: list[int],
        extents: Callable[[int, int], list[qemu_img.Extent]],
        close: Callable[[], None],
        before_qemu: Callable[[], None] | None = None,
    ) -> None:
        """Reads layer ``n`` of the chain through ``fds[n]``; ``extents(start, length)``
        covers a range; ``close`` lets go of the descriptors; ``before_qemu`` runs
        before the first qemu-nbd starts."""
        self._path, self._size, self._fds = path, size, fds
        self._extents, self._close = extents, close
        self._before_qemu = before_qemu
        self._nbd: NbdHandle | None = None
        self._nbd_lock = threading.Lock()

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
        try:
            extents = self._extents(offset, length)
        except (Unreadable, struct.error) as exc:  # QEMU would call the file corrupt too
            raise StorageError(f"{self._path}: cannot map {offset}+{length}: {exc}") from exc
        for e in extents:
            n = min(end, e.start + e.length) - pos
            if e.start > pos or n <= 0:
                break
            self._piece(e, pos, view[pos - offset : pos - offset + n])
            pos += n
        if pos < end:
            raise StorageError(f"{self._path}: no map entry for offset {pos}")

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
                    if self._before_qemu is not None:
                        self._before_qemu()
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
        self._close()
        self._fds = []
        if self._nbd is not None:
            self._nbd.close()
            self._nbd = None
