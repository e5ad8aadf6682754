"""The header of a qcow2 file, read by snapback itself (QEMU's docs/interop/qcow2.txt).

Only version 3, the one QEMU writes by default and the local pool makes. Anything
this reader does not expect raises ``Unreadable``, and the caller asks QEMU
instead: a doubt costs time, never a wrong answer.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
EXT_END, EXT_BACKING_FORMAT, EXT_DATA_FILE = 0, 0xE2792ACA, 0x44415441
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTENDED_L2 = 8, 16
FIELDS = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # up to and with header_length (104 bytes)
MAX_CLUSTER_BITS = 21


class Unreadable(Exception):
    """The file is not laid out as this reader expects: ask QEMU."""


@dataclass(frozen=True)
class Header:
    cluster_bits: int
    size: int  # guest-visible bytes
    crypt_method: int
    l1_size: int
    l1_offset: int
    incompatible: int
    autoclear: int
    backing: str | None  # the backing file's name as written in the file
    extensions: dict[int, bytes]  # header extensions by type

    @property
    def cluster(self) -> int:
        return 1 << self.cluster_bits


def read_header(fd: int) -> Header:
    head = os.pread(fd, 4096, 0)
    if len(head) < FIELDS.size or head[:4] != MAGIC:
        raise Unreadable("not a qcow2 file")
    (
        _, version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size,
        l1_offset, _, _, _, _, incompatible, _, autoclear, _, header_len,
    ) = FIELDS.unpack_from(head)  # fmt: skip
    if version != 3 or not 9 <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Unreadable(f"qcow2 version {version}, cluster bits {cluster_bits}")
    cluster = 1 << cluster_bits
    if not FIELDS.size <= header_len <= cluster or header_len % 8:
        raise Unreadable(f"header length {header_len}")
    if backing_offset + backing_size > cluster or backing_size > 1023:
        raise Unreadable("backing file name outside the first cluster")
    end = max(4096, backing_offset + backing_size)
    if end > len(head):
        head += os.pread(fd, end - len(head), len(head))
    backing = None
    if backing_offset:
        raw = head[backing_offset : backing_offset + backing_size]
        if len(raw) != backing_size:
            raise Unreadable("backing file name truncated")
        backing = raw.decode("utf-8", "strict")
    return Header(
        cluster_bits, size, crypt, l1_size, l1_offset, incompatible, autoclear, backing,
        _extensions(head, header_len, min(cluster, len(head))),
    )  # fmt: skip


def _extensions(head: bytes, pos: int, end: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    pos = (pos + 7) // 8 * 8
    while True:
        if pos + 8 > end:
            raise Unreadable("header extensions run past what was read")
        kind, length = struct.unpack_from(">II", head, pos)
        if kind == EXT_END:
            return found
        if pos + 8 + length > end:
            raise Unreadable("header extension runs past what was read")
        found[kind] = head[pos + 8 : pos + 8 + length]
        pos += 8 + (length + 7) // 8 * 8
