"""Checks for boot files: a kernel (glance's ``aki``) and an initial ramdisk (``ari``).

QEMU loads these itself when an instance boots directly (``<kernel>``,
``<initrd>``), so they pass our own checks first, like disk images do.
"""

from __future__ import annotations

import os
import struct

from snapback.domain.errors import UnsafeImage

MAX_KERNEL = 256 << 20
MAX_RAMDISK = 1 << 30
_RAMDISK_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"070701": "cpio (newc)",
    b"070702": "cpio (crc)",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x02\x21\x4c\x18": "lz4",
    b"BZh": "bzip2",
    b"\x89LZO": "lzo",
}


def _head(path: str, length: int, limit: int, what: str) -> tuple[bytes, int]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(length)
    except OSError as exc:
        raise UnsafeImage(f"{path}: cannot read the file: {exc.strerror}") from exc
    if size == 0:
        raise UnsafeImage(f"{path}: the file is empty")
    if size > limit:
        raise UnsafeImage(f"{path}: a {what} larger than {limit >> 20} MiB is refused")
    return head, size


def inspect_kernel(path: str) -> int:
    """A Linux x86 boot image (bzImage, boot protocol 2.x); returns its size."""
    head, size = _head(path, 0x210, MAX_KERNEL, "kernel")
    if len(head) < 0x208 or head[0x202:0x206] != b"HdrS":
        raise UnsafeImage(f"{path}: not a Linux kernel (no 'HdrS' boot header at 0x202)")
    version = struct.unpack("<H", head[0x206:0x208])[0]
    if version < 0x0200:
        raise UnsafeImage(
            f"{path}: kernel boot protocol {version >> 8}.{version & 0xFF} is too old"
        )
    return size


def inspect_ramdisk(path: str) -> int:
    """An initramfs: a cpio archive, plain or compressed; returns its size."""
    head, size = _head(path, 8, MAX_RAMDISK, "ramdisk")
    if not any(head.startswith(magic) for magic in _RAMDISK_MAGIC):
        raise UnsafeImage(f"{path}: not an initramfs (no cpio or known compression header)")
    return size
