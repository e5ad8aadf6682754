"""Writing a new qcow2 file ourselves: the fast path of a restore into a new volume.

A restore writes every chunk of a disk once into a volume nobody else uses yet.
Through qemu-nbd each chunk crosses a socket and is written again by QEMU; here
the workers ``pwrite`` data clusters straight into the file (``O_DIRECT`` when
the range is aligned, so the page cache is not filled with data that is only
written), and ``close`` lays out the metadata QEMU would have written: L2 and L1
tables, refcount blocks and table, then the header. The result is the same
kind of file ``qemu-img create -f qcow2 -o cluster_size=65536`` makes (version 3,
16-bit refcounts, no backing file, no extensions), and ``qemu-img check`` must
find it clean before the handle closes without error.

Layout: cluster 0 is the header; data clusters follow in the order writes
arrive (a write's clusters are taken together, so a 4 MiB chunk lands in one
run); the metadata comes after the last data cluster. Ranges never written
stay unallocated and read as zeroes. Memory: one 8-byte entry per 64 KiB of
the guest's 512 MiB regions that were written to, as in QEMU's own L2 tables.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from array import array
from math import ceil

from snapback.domain.errors import StorageError
from snapback.drivers.buffers import LIBC, address
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.storage.base import BlockHandle

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8  # 8192 entries: one L2 table maps 512 MiB
REFS_PER_BLOCK = CLUSTER // 2  # 16-bit refcounts
COPIED = 1 << 63  # L1/L2 flag: the cluster's refcount is exactly one
ALIGN = 4096  # O_DIRECT: offset, length and buffer address
RESERVE = 4096  # clusters (256 MiB) allocated ahead of the data at a time
_c_fallocate = LIBC.fallocate
_c_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_c_fallocate.restype = ctypes.c_int
HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # version 3, 104 bytes


class FreshQcow2(BlockHandle):
    """Write access to a new, empty volume file, replaced by a qcow2 of our making."""

    parallel_writes = True

    def __init__(self, path: str, size: int) -> None:
        self._path, self._size = path, size
        self._l1_size = max(1, ceil(size / (CLUSTER * L2_ENTRIES)))
        self._l2: dict[int, array[int]] = {}  # L1 index -> host cluster of each entry, 0 = none
        self._next = 1  # cluster 0 is the header
        self._reserved = 1  # clusters below this one are allocated in the file
        self._lock = threading.Lock()
        self._local = threading.local()
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags | os.O_TRUNC)
        except OSError as exc:
            raise StorageError(f"cannot open {path} to write: {exc.strerror}") from exc
        try:
            self._direct: int | None = os.open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a file system without O_DIRECT (tmpfs)
                os.close(self._fd)
                raise StorageError(f"cannot open {path} to write: {exc.strerror}") from exc
            self._direct = None
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    # -- data ---------------------------------------------------------------
    def _clusters(self, first: int, count: int) -> list[tuple[int, int, int]]:
        """Host runs (guest cluster, host cluster, clusters) for guest clusters
        ``first``..``first+count-1``, allocating the missing ones together."""
        runs: list[tuple[int, int, int]] = []
        with self._lock:
            for g in range(first, first + count):
                table = self._l2.get(g // L2_ENTRIES)
                if table is None:
                    table = self._l2[g // L2_ENTRIES] = array("q", bytes(8 * L2_ENTRIES))
                host = table[g % L2_ENTRIES]
                if host == 0:
                    host = table[g % L2_ENTRIES] = self._next
                    self._next += 1
                    if self._next > self._reserved:
                        self._reserve()
                if runs and runs[-1][1] + runs[-1][2] == host and runs[-1][0] + runs[-1][2] == g:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
                else:
                    runs.append((g, host, 1))
        return runs

    def _reserve(self) -> None:
        """Allocate the file's next ``RESERVE`` clusters ahead of the data (the caller
        holds the lock). An O_DIRECT write that must allocate, or that extends the
        file, takes ext4's inode lock alone: the workers would write one at a time.
        Into reserved space they write together. ``close`` cuts off what is left.
        Only a speed-up: a file system that cannot (or a full one) goes on without."""
        start = self._reserved
        self._reserved = max(self._next, start + RESERVE)
        _fallocate(self._fd, start << CLUSTER_BITS, (self._reserved - start) << CLUSTER_BITS)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise StorageError("the volume is closed")
        length = len(data)
        if offset < 0 or offset + length > self._size:
            raise StorageError(f"range {offset}+{length} lies outside the volume ({self._size})")
        if length == 0:
            return
        view = memoryview(data).cast("B")
        first = offset >> CLUSTER_BITS
        last = (offset + length - 1) >> CLUSTER_BITS
        for g, host, count in self._clusters(first, last - first + 1):
            lo = max(offset, g << CLUSTER_BITS)
            hi = min(offset + length, (g + count) << CLUSTER_BITS)
            at = (host << CLUSTER_BITS) + (lo - (g << CLUSTER_BITS))
            self._pwrite(view[lo - offset : hi - offset], at)

    def write_view(self, offset: int, data: memoryview) -> None:
        self.write(offset, data)

    def _pwrite(self, piece: memoryview, at: int) -> None:
        n = len(piece)
        if self._direct is not None and at % ALIGN == 0 and n % ALIGN == 0:
            where = address(piece)
            if where is None or where % ALIGN:  # O_DIRECT wants aligned memory too
                buf = self._aligned(n)
                buf[:n] = piece
                piece = memoryview(buf)[:n]
            fd = self._direct
        else:
            fd = self._fd
        try:
            _write_all(fd, piece, at)
        except OSError as exc:
            raise StorageError(f"write failed at {at} of {self._path}: {exc.strerror}") from exc

    def _aligned(self, n: int) -> mmap.mmap:
        """This thread's page-aligned buffer of at least ``n`` bytes (kept for reuse)."""
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            if buf is not None:
                buf.close()
            buf = self._local.buf = mmap.mmap(-1, max(n, 4 << 20))
        return buf

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self._size:
            raise StorageError(f"range {offset}+{length} lies outside the volume ({self._size})")
        out = bytearray(length)
        pos = offset
        while pos < offset + length:
            g = pos >> CLUSTER_BITS
            n = min(offset + length, (g + 1) << CLUSTER_BITS) - pos
            table = self._l2.get(g // L2_ENTRIES)
            host = table[g % L2_ENTRIES] if table is not None else 0
            if host:
                at = (host << CLUSTER_BITS) + (pos - (g << CLUSTER_BITS))
                got = os.preadv(self._fd, [memoryview(out)[pos - offset : pos - offset + n]], at)
                if got < n:  # a hole at the end of the file so far: zeroes
                    out[pos - offset + got : pos - offset + n] = bytes(n - got)
            pos += n
        return bytes(out)

    # -- metadata -------------------------------------------------------------
    def _layout(self) -> tuple[dict[int, int], int, int, int, int, int]:
        """Where the metadata goes after the data: (L1 index -> its L2 table's
        cluster, L1 table cluster, refcount table cluster, its clusters, first
        refcount block cluster, refcount blocks); every cluster below the last
        one is in use."""
        at = self._next
        l2_at = {}
        for index in sorted(self._l2):
            l2_at[index], at = at, at + 1
        l1_at, at = at, at + ceil(self._l1_size * 8 / CLUSTER)
        blocks = table_clusters = 0
        while True:  # the refcount structures count themselves
            total = at + table_clusters + blocks
            need_blocks = ceil(total / REFS_PER_BLOCK)
            need_table = ceil(need_blocks * 8 / CLUSTER)
            if (need_blocks, need_table) == (blocks, table_clusters):
                return l2_at, l1_at, at, table_clusters, at + table_clusters, blocks
            blocks, table_clusters = need_blocks, need_table

    def _write_metadata(self) -> None:
        l2_at, l1_at, rt_at, rt_clusters, rb_at, blocks = self._layout()
        total = rb_at + blocks
        l1 = array("Q", bytes(8 * self._l1_size))
        for index, table in self._l2.items():
            entries = array("Q", (COPIED | (h << CLUSTER_BITS) if h else 0 for h in table))
            entries.byteswap()  # big-endian on disk (this machine is little-endian)
            self._put(entries.tobytes(), l2_at[index] << CLUSTER_BITS)
            l1[index] = COPIED | (l2_at[index] << CLUSTER_BITS)
        l1.byteswap()
        self._put(l1.tobytes(), l1_at << CLUSTER_BITS)
        table = array("Q", ((rb_at + b) << CLUSTER_BITS for b in range(blocks)))
        table.byteswap()
        self._put(table.tobytes(), rt_at << CLUSTER_BITS)
        ones = struct.pack(">H", 1)
        for b in range(blocks):
            used = min(REFS_PER_BLOCK, total - b * REFS_PER_BLOCK)
            self._put(ones * used, (rb_at + b) << CLUSTER_BITS)
        header = HEADER.pack(
            b"QFI\xfb", 3, 0, 0, CLUSTER_BITS, self._size, 0, self._l1_size,
            l1_at << CLUSTER_BITS, rt_at << CLUSTER_BITS, rt_clusters, 0, 0,
            0, 0, 0, 4, HEADER.size,
        )  # fmt: skip
        self._put(header + bytes(8), 0)  # then the end of header extensions
        os.ftruncate(self._fd, total << CLUSTER_BITS)

    def _put(self, data: bytes, at: int) -> None:
        _write_all(self._fd, data, at)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._write_metadata()
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StorageError(f"cannot finish {self._path}: {exc.strerror}") from exc
        finally:
            for fd in (self._fd, self._direct):
                if fd is not None:
                    os.close(fd)
        qemu_img.check(self._path)


def _fallocate(fd: int, offset: int, length: int) -> None:
    """fallocate(2) that may fail (glibc's posix_fallocate would write zeroes instead)."""
    _c_fallocate(fd, 0, offset, length)


def _write_all(fd: int, data: bytes | memoryview, at: int) -> None:
    """``pwrite`` until every byte is written (a short write goes on where it stopped)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], at + done)
