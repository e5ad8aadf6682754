"""Byte access to a qcow2 chain through qemu-nbd and libnbd.

libnbd starts qemu-nbd itself (systemd socket activation), so the export lives
exactly as long as the handle. Only files the project made are opened here.
"""

from __future__ import annotations

import contextlib
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
