"""Where each guest byte of a qcow2 chain lives, read from the files' own tables.

The backup's mapped reader needs, for each range it reads, the layer file and the
offset holding it. ``qemu-img map`` and ``qemu-img info --backing-chain`` answer
for the whole disk at about 12 ms each of process start-up; an incremental backup
reads a few dozen chunks. This reader follows the chain from the headers and looks
up only the L1 and L2 entries of the ranges asked for (QEMU's
docs/interop/qcow2.txt, "Cluster mapping"):

- L1 entry: bits 9-55 the offset of an L2 table, 0 when there is none;
- L2 entry: bit 62 compressed; else bit 0 reads as zeroes, bits 9-55 the offset
  of the data cluster, 0 when the cluster is not allocated here (read below);
- past a backing layer's end, and below the last layer, the disk reads zeroes.

Only for chains of our own files that nothing writes meanwhile (see
``direct.py``). A layer this reader does not expect (encryption, an external data
file, extended L2 entries, a dirty or corrupt flag, reserved bits set, a backing
file named by a protocol or without a format) raises ``Unreadable``, and the
caller asks QEMU instead.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from dataclasses import dataclass, field

from snapback.drivers.imagefmt.qcow2_header import (
    EXT_BACKING_FORMAT,
    INCOMPAT_COMPRESSION,
    Header,
    Unreadable,
    read_header,
)
from snapback.drivers.imagefmt.qemu_img import Extent

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COMPRESSED, ZERO_FLAG = 1 << 62, 1
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE
MAX_CHAIN = 64
DATA, ZERO, PACKED = "data", "zero", "compressed"


@dataclass
class _Layer:
    path: str
    fd: int
    size: int  # guest bytes this layer covers
    head: Header | None  # None: raw
    l1: tuple[int, ...] = ()
    l2: dict[int, tuple[int, ...]] = field(default_factory=dict)


class Qcow2Chain:
    """The chain ending in ``path``, head first, with its descriptors open."""

    def __init__(self, path: str) -> None:
        self.layers: list[_Layer] = []
        self._lock = threading.Lock()
        opened = False
        try:
            self._open(path)
            opened = True
        finally:
            if not opened:  # the error goes on to the caller; the descriptors do not leak
                self.close()

    @property
    def size(self) -> int:
        return self.layers[0].size

    @property
    def fds(self) -> list[int]:
        return [layer.fd for layer in self.layers]

    def _open(self, path: str) -> None:
        fmt = "qcow2"
        while True:
            if len(self.layers) >= MAX_CHAIN:
                raise Unreadable(f"chain longer than {MAX_CHAIN} layers")
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise Unreadable(f"cannot open {path}: {exc.strerror}") from exc
            if fmt == "raw":
                self.layers.append(_Layer(path, fd, os.fstat(fd).st_size, None))
                return
            layer = _Layer(path, fd, 0, None)
            self.layers.append(layer)
            head = layer.head = _usable(read_header(fd))
            layer.size = head.size
            layer.l1 = _table(fd, head.l1_offset, head.l1_size, head, "L1")
            if any(e & L1_RESERVED or (e & OFFSET_MASK) % head.cluster for e in layer.l1):
                raise Unreadable(f"{path}: L1 entry with reserved bits or unaligned")
            if head.backing is None:
                return
            fmt = head.extensions.get(EXT_BACKING_FORMAT, b"").decode("ascii", "replace")
            if fmt not in ("qcow2", "raw"):
                raise Unreadable(f"{path}: backing format {fmt or 'not stated'}")
            path = _backing_path(path, head.backing)

    def close(self) -> None:
        for layer in self.layers:
            with contextlib.suppress(OSError):
                os.close(layer.fd)
        self.layers = []

    def extents(self, start: int, length: int) -> list[Extent]:
        """The extents covering ``[start, start + length)`` (within the disk), merged."""
        step = min((1 << x.head.cluster_bits for x in self.layers if x.head), default=65536)
        out: list[Extent] = []
        pos, end = start, min(start + length, self.size)
        while pos < end:
            n = min(step - pos % step, end - pos)
            kind, depth, host = self._resolve(pos)
            new = Extent(pos, n, kind != ZERO, depth, host)
            last = out[-1] if out else None
            if (
                last is not None
                and (last.data, last.depth) == (new.data, new.depth)
                and (
                    last.offset is None
                    if new.offset is None
                    else last.offset is not None and last.offset + last.length == new.offset
                )
            ):
                out[-1] = Extent(last.start, last.length + n, last.data, last.depth, last.offset)
            else:
                out.append(new)
            pos += n
        return out

    def _resolve(self, pos: int) -> tuple[str, int, int | None]:
        """What reads at ``pos``: (data, layer, host offset), (compressed, layer, None)
        or (zero, 0, None)."""
        for depth, layer in enumerate(self.layers):
            if pos >= layer.size:
                return ZERO, 0, None
            if layer.head is None:
                return DATA, depth, pos
            entry = self._l2_entry(layer, pos)
            if entry & COMPRESSED:
                return PACKED, depth, None
            cluster = layer.head.cluster
            host = entry & OFFSET_MASK
            if entry & L2_RESERVED or host % cluster:
                raise Unreadable(f"{layer.path}: L2 entry with reserved bits or unaligned")
            if entry & ZERO_FLAG:
                return ZERO, 0, None
            if host:
                return DATA, depth, host + pos % cluster
        return ZERO, 0, None

    def _l2_entry(self, layer: _Layer, pos: int) -> int:
        head = layer.head
        assert head is not None
        l2_bits = head.cluster_bits - 3
        index = pos >> head.cluster_bits
        l1_index = index >> l2_bits
        if l1_index >= len(layer.l1):
            return 0
        l2_offset = layer.l1[l1_index] & OFFSET_MASK
        if not l2_offset:
            return 0
        with self._lock:
            table = layer.l2.get(l2_offset)
        if table is None:
            table = _table(layer.fd, l2_offset, 1 << l2_bits, head, "L2")
            with self._lock:
                layer.l2[l2_offset] = table
        return table[index & ((1 << l2_bits) - 1)]


def _usable(head: Header) -> Header:
    if head.crypt_method:
        raise Unreadable("encrypted")
    if head.incompatible & ~INCOMPAT_COMPRESSION:
        raise Unreadable(f"incompatible features {head.incompatible:#x}")
    return head


def _table(fd: int, offset: int, entries: int, head: Header, what: str) -> tuple[int, ...]:
    if offset % head.cluster or entries > (32 << 20) // 8:
        raise Unreadable(f"{what} table at {offset} of {entries} entries")
    raw = os.pread(fd, 8 * entries, offset)
    if len(raw) != 8 * entries:
        raise Unreadable(f"{what} table runs past the end of the file")
    return struct.unpack(f">{entries}Q", raw)


def _backing_path(path: str, name: str) -> str:
    """The backing file's path as QEMU finds it: relative to the overlay's folder."""
    if not name or name.startswith("json:") or ":" in name.split("/", 1)[0]:
        raise Unreadable(f"backing file {name!r} is not a plain file name")
    return name if name.startswith("/") else os.path.join(os.path.dirname(path), name)
