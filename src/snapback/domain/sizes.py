"""Sizes as users write them (``10G``, ``512M``, ``4096``) and as people read them."""

from __future__ import annotations

import re

from snapback.domain.errors import InvalidInput

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)
MAX_VOLUME_SIZE = 1 << 50  # 1 PiB: far beyond anything sane, far below overflow


def parse_size(text: str) -> int:
    """Parse a size with an optional binary unit: ``10G`` = 10 GiB, ``1.5T``, ``512``.

    Units are powers of 1024 as in qemu-img and rbd. The result is rounded up to
    a whole 512-byte sector.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise InvalidInput(f"invalid size {text!r}: use a number with an optional K, M, G, T or P")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[unit.upper()])
    size = (size + 511) // 512 * 512
    if size <= 0:
        raise InvalidInput(f"size {text!r} must be greater than zero")
    if size > MAX_VOLUME_SIZE:
        raise InvalidInput(f"size {text!r} is larger than the limit of 1 PiB")
    return size


def format_size(size: int) -> str:
    """A short human form: ``10 GiB``, ``1.5 MiB``, ``512 B``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    return f"{value:.1f} PiB"
