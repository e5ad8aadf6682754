"""Our own disk image header inspector.

Nothing a user hands us reaches qemu-img or QEMU before ``inspect()`` has read
its header and said it is a plain raw disk or a self-contained qcow2 (DESIGN
§4.7). qemu-img follows backing files, external data files and VMDK extents
wherever they point; a hostile file can use that to read host files into an
image. So we refuse, with a message naming the reason:

- qcow2 with a backing file (``json:`` pseudo-files included), an external data
  file, encryption, incompatible features we do not know, a dirty or corrupt
  flag, absurd table sizes, or tables/clusters beyond the end of the file;
- any other format (VMDK sparse or descriptor, VHD, VHDX, VDI, QED, LUKS, ...);
- a file that declares one format and is another;
- anything we cannot recognise (an empty file, a "raw" file whose size is not
  a whole number of sectors).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from snapback.domain.errors import UnsafeImage
from snapback.domain.models import DiskFormat
from snapback.domain.sizes import MAX_VOLUME_SIZE

QCOW2_MAGIC = b"QFI\xfb"
MAX_L1_BYTES = 32 << 20  # QEMU's own QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_METADATA_READ = 1 << 30  # never read more than 1 GiB of L2 tables

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
EXT_ENCRYPTION = 0x0537BE77

OFFSET_MASK = 0x00FFFFFFFFFFFE00

Reject = Callable[[str], UnsafeImage]


@dataclass(frozen=True)
class InspectedImage:
    format: DiskFormat
    virtual_size: int
    file_size: int
    cluster_size: int = 0


def inspect(path: str, declared: DiskFormat | None = None) -> InspectedImage:
    """Inspect ``path``; return what it is, or raise UnsafeImage with the reason.

    ``declared`` is the format the user says the file has; a file of another
    format is refused. With ``None`` the format is detected (qcow2 or raw).
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(65536)
            foreign = _foreign_format(f, head, size)
            if head[:4] == QCOW2_MAGIC:
                if declared is DiskFormat.RAW:
                    raise UnsafeImage(f"{path}: declared raw but the file is a qcow2 image")
                return _inspect_qcow2(path, f, head, size)
    except OSError as exc:
        raise UnsafeImage(f"{path}: cannot read the file: {exc.strerror}") from exc
    if foreign:
        raise UnsafeImage(f"{path}: {foreign} images are not accepted (only raw and qcow2)")
    if declared is DiskFormat.QCOW2:
        raise UnsafeImage(f"{path}: declared qcow2 but the file has no qcow2 header")
    if size == 0:
        raise UnsafeImage(f"{path}: the file is empty")
    if size % 512:
        raise UnsafeImage(
            f"{path}: unrecognised file: not a known image format, and its size ({size} bytes) "
            "is not a whole number of 512-byte sectors as a raw disk's is"
        )
    if size > MAX_VOLUME_SIZE:
        raise UnsafeImage(f"{path}: raw disk larger than 1 PiB")
    return InspectedImage(DiskFormat.RAW, size, size)


def _foreign_format(f: BinaryIO, head: bytes, size: int) -> str | None:
    """Name the format if the file is an image format we do not accept."""
    if head[:4] == QCOW2_MAGIC:
        version = struct.unpack(">I", head[4:8])[0] if len(head) >= 8 else 0
        return "qcow (version 1)" if version == 1 else None
    signatures = [
        (0, b"KDMV", "VMDK"),
        (0, b"COWD", "VMDK (ESX COW)"),
        (0, b"conectix", "VHD"),
        (0, b"vhdxfile", "VHDX"),
        (0, b"QED\x00", "QED"),
        (0, b"LUKS\xba\xbe", "LUKS"),
        (0, b"WithoutFreeSpace", "Parallels"),
        (0, b"WithouFreSpacExt", "Parallels"),
        (0, b"Bochs Virtual HD Image", "Bochs"),
        (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
        (0x40, struct.pack("<I", 0xBEDA107F), "VDI"),
    ]
    for offset, magic, name in signatures:
        if head[offset : offset + len(magic)] == magic:
            return name
    text = head[:4096]
    if b"# Disk DescriptorFile" in text or b"createType=" in text:
        return "VMDK descriptor"
    if size >= 512:
        f.seek(size - 512)
        tail = f.read(512)
        if tail[:8] == b"conectix":
            return "VHD"
        if tail[:4] == b"koly":
            return "DMG"
    return None


def _inspect_qcow2(path: str, f: BinaryIO, head: bytes, size: int) -> InspectedImage:
    def bad(reason: str) -> UnsafeImage:
        return UnsafeImage(f"{path}: qcow2 image refused: {reason}")

    if len(head) < 72:
        raise bad("the header is truncated")
    (
        _magic,
        version,
        backing_off,
        backing_len,
        cluster_bits,
        vsize,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
    ) = struct.unpack(">IIQIIQIIQQIIQ", head[:72])
    _check_basics(f, size, version, (backing_off, backing_len), cluster_bits, crypt, vsize, bad)
    cluster = 1 << cluster_bits
    header_len, extl2 = _v3_header(head, cluster, bad) if version == 3 else (72, False)
    _check_extensions(head, header_len, cluster, bad)
    l2_entry = 16 if extl2 else 8
    l2_entries = cluster // l2_entry
    needed_l1 = -(-vsize // (cluster * l2_entries))
    if l1_size * 8 > MAX_L1_BYTES:
        raise bad(f"L1 table of {l1_size} entries is larger than QEMU's 32 MiB limit")
    if l1_size < needed_l1:
        raise bad(f"L1 table of {l1_size} entries is too small for virtual size {vsize}")
    if rt_clusters * cluster > MAX_REFTABLE_BYTES or rt_clusters == 0:
        raise bad(f"refcount table of {rt_clusters} clusters is absurd")
    if nb_snap > MAX_SNAPSHOTS:
        raise bad(f"{nb_snap} internal snapshots is absurd")
    _check_within(l1_off, l1_size * 8, cluster, size, "L1 table", bad)
    _check_within(rt_off, rt_clusters * cluster, cluster, size, "refcount table", bad)
    if nb_snap:
        _check_within(snap_off, 1, 8, size, "snapshot table", bad)
    _check_refcount_table(f, rt_off, rt_clusters * cluster, cluster, size, bad)
    _check_l2_tables(f, l1_off, l1_size, cluster, cluster_bits, l2_entry, size, bad)
    return InspectedImage(DiskFormat.QCOW2, vsize, size, cluster)


def _check_basics(
    f: BinaryIO,
    size: int,
    version: int,
    backing: tuple[int, int],
    cluster_bits: int,
    crypt: int,
    vsize: int,
    bad: Reject,
) -> None:
    """Version, backing file, cluster size, encryption and virtual size."""
    if version not in (2, 3):
        raise bad(f"unknown qcow2 version {version}")
    backing_off, backing_len = backing
    if backing_off or backing_len:
        name = _read_at(f, backing_off, min(backing_len, 1023), size)
        shown = name.decode(errors="replace") if name else "?"
        raise bad(f"it names a backing file ({shown!r}); only self-contained images are accepted")
    if not 9 <= cluster_bits <= 21:
        raise bad(f"cluster size 2^{cluster_bits} is outside 512 B..2 MiB")
    if crypt:
        raise bad("it is encrypted")
    if vsize == 0 or vsize > MAX_VOLUME_SIZE:
        raise bad(f"virtual size {vsize} is absurd")
    if vsize % 512:  # QEMU would round it down to whole sectors: another size than ours
        raise bad(f"virtual size {vsize} is not a whole number of 512-byte sectors")


def _v3_header(head: bytes, cluster: int, bad: Reject) -> tuple[int, bool]:
    """A version 3 header's length, and whether its L2 entries are extended (16 bytes)."""
    if len(head) < 104:
        raise bad("the version 3 header is truncated")
    incompat = struct.unpack(">Q", head[72:80])[0]
    refcount_order, header_len = struct.unpack(">II", head[96:104])
    if refcount_order > 6:
        raise bad(f"refcount order {refcount_order} is invalid")
    if header_len < 104 or header_len > min(cluster, len(head)) or header_len % 8:
        raise bad(f"header length {header_len} is invalid")
    _check_incompatible(incompat, bad)
    return header_len, bool(incompat & INCOMPAT_EXTL2)


def _check_incompatible(incompat: int, bad: Reject) -> None:
    if incompat & ~INCOMPAT_KNOWN:
        raise bad(f"unknown incompatible features 0x{incompat & ~INCOMPAT_KNOWN:x}")
    if incompat & INCOMPAT_DATA_FILE:
        raise bad("it uses an external data file")
    if incompat & INCOMPAT_CORRUPT:
        raise bad("it is marked corrupt")
    if incompat & INCOMPAT_DIRTY:
        raise bad("it was not closed cleanly (dirty flag set); repair a trusted copy first")


def _check_extensions(head: bytes, start: int, cluster: int, bad: Reject) -> None:
    pos, limit = start, min(cluster, len(head))
    while True:
        if pos + 8 > limit:
            raise bad("header extensions run past the first cluster")
        ext_type, ext_len = struct.unpack(">II", head[pos : pos + 8])
        if ext_type == EXT_END:
            return
        if ext_type == EXT_DATA_FILE:
            raise bad("it names an external data file")
        if ext_type == EXT_ENCRYPTION:
            raise bad("it carries an encryption header")
        pos += 8 + (ext_len + 7) // 8 * 8


def _check_within(offset: int, length: int, align: int, size: int, what: str, bad: Reject) -> None:
    if offset % align:
        raise bad(f"{what} offset {offset} is not aligned")
    if offset == 0 or offset + length > size:
        raise bad(f"{what} at {offset}+{length} lies beyond the end of the file ({size} bytes)")


def _check_refcount_table(
    f: BinaryIO, offset: int, length: int, cluster: int, size: int, bad: Reject
) -> None:
    for block in _entries(f, offset, length):
        block &= OFFSET_MASK
        if block:
            _check_within(block, cluster, cluster, size, "refcount block", bad)


def _check_l2_tables(
    f: BinaryIO,
    l1_off: int,
    l1_size: int,
    cluster: int,
    cluster_bits: int,
    l2_entry: int,
    size: int,
    bad: Reject,
) -> None:
    """Every L2 table lies inside the file, and so does every cluster it points at.

    This is what catches a file truncated at a cluster boundary. Two L1 entries
    naming one L2 table are refused: QEMU never writes that, and such a file made
    checking cost a pass per entry (scripts/fuzz.py: 896 KiB took 15 s here, and
    once accepted `qemu-img check` ran past 10 s), so the reads stay within the file.
    """
    read = 0
    compressed_bits = 62 - (cluster_bits - 8)
    seen: set[int] = set()
    for l2_off in _entries(f, l1_off, l1_size * 8):
        l2_off &= OFFSET_MASK
        if not l2_off:
            continue
        if l2_off in seen:
            raise bad(f"two L1 entries name the L2 table at {l2_off}")
        seen.add(l2_off)
        _check_within(l2_off, cluster, cluster, size, "L2 table", bad)
        read += cluster
        if read > MAX_METADATA_READ:
            raise bad("more than 1 GiB of L2 tables")
        entries = list(_entries(f, l2_off, cluster))
        for entry in entries[:: l2_entry // 8]:
            if entry & (1 << 62):
                host = entry & ((1 << compressed_bits) - 1)
                if host >= size:
                    raise bad(f"a compressed cluster at {host} lies beyond the end of the file")
                continue
            host = entry & OFFSET_MASK
            if host and host >= size:
                raise bad(
                    f"a data cluster at {host} lies beyond the end of the file ({size} bytes)"
                )
            if host % cluster:
                raise bad(f"a data cluster offset {host} is not aligned")


def _entries(f: BinaryIO, offset: int, length: int) -> Iterator[int]:
    f.seek(offset)
    data = f.read(length)
    yield from (v for (v,) in struct.iter_unpack(">Q", data[: len(data) // 8 * 8]))


def _read_at(f: BinaryIO, offset: int, length: int, size: int) -> bytes:
    if offset <= 0 or offset >= size or length <= 0:
        return b""
    f.seek(offset)
    return f.read(length)
