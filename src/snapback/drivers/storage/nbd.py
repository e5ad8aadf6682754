"""Byte access to a qcow2 chain through qemu-nbd and libnbd.

libnbd starts qemu-nbd itself (systemd socket activation), so the export lives
exactly as long as the handle. Only files the project made are opened here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from snapback.domain.errors import StorageError
from snapback.drivers.storage.base import BlockHandle

MAX_REQUEST = 8 << 20  # qemu-nbd drops the connection on requests over 32 MiB


def _nbd() -> Any:
    try:
        import nbd
    except ImportError as exc:  # the binding is a Debian package (python3-libnbd)
        raise StorageError("libnbd Python binding missing: run scripts/bootstrap.sh") from exc
    return nbd


class NbdHandle(BlockHandle):
    parallel_writes = True  # libnbd handles are thread-safe; qemu-nbd serves requests at once
    parallel_reads = True

    def __init__(self, path: str, *, read_only: bool) -> None:
        nbd = _nbd()
        argv = ["qemu-nbd", "-f", "qcow2", "--cache=none" if not read_only else "--cache=writeback"]
        if read_only:
            argv.append("--read-only")
        argv.append(path)
        self._h = nbd.NBD()
        self._read_only = read_only
        try:
            self._h.connect_systemd_socket_activation(argv)
            self._size = int(self._h.get_size())
        except nbd.Error as exc:
            raise StorageError(f"cannot open {path} through qemu-nbd: {exc}") from exc

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        out = bytearray()
        try:
            for off in range(offset, offset + length, MAX_REQUEST):
                out += self._h.pread(min(MAX_REQUEST, offset + length - off), off)
        except _nbd().Error as exc:
            raise StorageError(f"read failed at {offset}: {exc}") from exc
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if self._read_only:
            raise StorageError("this handle is read-only (a snapshot)")
        self._check(offset, len(data))
        view = memoryview(data)
        try:
            for pos in range(0, len(data), MAX_REQUEST):
                self._h.pwrite(view[pos : pos + MAX_REQUEST], offset + pos)
        except _nbd().Error as exc:
            raise StorageError(f"write failed at {offset}: {exc}") from exc

    def close(self) -> None:
        nbd = _nbd()
        with contextlib.suppress(nbd.Error):
            if not self._read_only:
                self._h.flush()
            self._h.shutdown()
        del self._h  # libnbd closes the handle and reaps qemu-nbd here

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise StorageError(
                f"range {offset}+{length} lies outside the volume ({self._size} bytes)"
            )


def _extents(h: Any, context: str, wanted: Callable[[int], bool]) -> list[tuple[int, int]]:
    """(offset, length) ranges whose block status in ``context`` satisfies ``wanted``."""
    nbd = _nbd()
    if not h.can_meta_context(context):
        raise StorageError(f"the NBD export does not offer {context}")
    size, offset = int(h.get_size()), 0
    found: list[tuple[int, int]] = []
    reached = [0]

    def seen(ctx: str, start: int, entries: list[int], err: Any) -> int:
        if ctx != context:
            return 0
        pos = start
        for i in range(0, len(entries), 2):
            if wanted(entries[i + 1]):
                if found and found[-1][0] + found[-1][1] == pos:
                    found[-1] = (found[-1][0], found[-1][1] + entries[i])
                else:
                    found.append((pos, entries[i]))
            pos += entries[i]
        reached[0] = max(reached[0], pos)
        return 0

    try:
        while offset < size:
            h.block_status(min(size - offset, 1 << 30), offset, seen)
            if reached[0] <= offset:
                raise StorageError(f"no block status past {offset}")
            offset = reached[0]
    except nbd.Error as exc:
        raise StorageError(f"block status failed: {exc}") from exc
    return found


def dirty_extents(path: str, bitmap: str) -> list[tuple[int, int]]:
    """(offset, length) ranges the qcow2 file's dirty bitmap ``bitmap`` marks, read
    through a read-only qemu-nbd export of it (NBD block status, meta context
    ``qemu:dirty-bitmap:NAME``)."""
    nbd = _nbd()
    context = f"qemu:dirty-bitmap:{bitmap}"
    h = nbd.NBD()
    h.add_meta_context(context)
    try:
        h.connect_systemd_socket_activation(["qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, path])
        return _extents(h, context, lambda flags: bool(flags & 1))
    except nbd.Error as exc:
        raise StorageError(f"cannot read bitmap {bitmap} of {path}: {exc}") from exc
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
        del h


class ExportHandle(NbdHandle):
    """Read-only access to one export of an NBD server that is already running (a
    libvirt backup job's), with its block status: ``allocated()`` and ``dirty()``."""

    def __init__(self, socket: str, export: str, bitmap: str | None = None) -> None:
        nbd = _nbd()
        self._h = nbd.NBD()
        self._read_only = True
        self._bitmap = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
        self._h.set_export_name(export)
        self._h.add_meta_context("base:allocation")
        if self._bitmap:
            self._h.add_meta_context(self._bitmap)
        try:
            self._h.connect_unix(socket)
            self._size = int(self._h.get_size())
        except nbd.Error as exc:
            raise StorageError(f"cannot open export {export} at {socket}: {exc}") from exc

    def allocated(self) -> list[tuple[int, int]]:
        return _extents(self._h, "base:allocation", lambda flags: not flags & 2)

    def dirty(self) -> list[tuple[int, int]]:
        assert self._bitmap is not None
        return _extents(self._h, self._bitmap, lambda flags: bool(flags & 1))
