"""The safe qemu-img runner.

Every call names the format (``-f``, and ``-F`` with a backing file), runs
under an address-space and CPU-time limit, and goes through
``snapback.drivers.process``. Callers hand it only files we made ourselves or
files our inspector has passed. ``SNAPBACK_QEMU_IMG`` may name another binary
(tests use a wrapper that logs every call).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snapback.domain.errors import StorageError
from snapback.domain.models import Progress
from snapback.drivers.process import Limits, run

INFO_LIMITS = Limits(address_space=1 << 30, cpu_seconds=60)
COPY_LIMITS = Limits(address_space=2 << 30, cpu_seconds=6 * 3600)
# librbd maps much virtual memory (thread stacks, caches): no address-space cap there
PROTOCOL_LIMITS = Limits(address_space=None, cpu_seconds=6 * 3600)
_PROGRESS_RE = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")

ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    data: bool  # False: reads as zeroes (hole or zero cluster)
    depth: int  # 0 = in the image itself, 1 = its backing file, ...
    offset: int | None = None  # where the data lies in that file (None: compressed)


def binary() -> str:
    return os.environ.get("SNAPBACK_QEMU_IMG", "qemu-img")


def info(path: str, fmt: str, *, chain: bool = False) -> dict[str, Any]:
    argv = [binary(), "info", "--output=json", "-U", "-f", fmt]
    if chain:
        argv.append("--backing-chain")
    argv.append(path)
    out = run(argv, limits=INFO_LIMITS).stdout
    try:
        parsed: Any = json.loads(out)
    except ValueError as exc:
        raise StorageError(f"qemu-img info gave unreadable output for {path}") from exc
    return parsed if isinstance(parsed, dict) else {"chain": parsed}


def create(path: str, size: int | None, *, backing: str | None = None) -> None:
    """Create a qcow2 file, optionally as an overlay of a qcow2 ``backing`` (relative paths ok)."""
    argv = [binary(), "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    argv.append(path)
    if size is not None:
        argv.append(str(size))
    run(argv, limits=INFO_LIMITS)


def resize(path: str, size: int, *, shrink: bool) -> None:
    argv = [binary(), "resize", "-q", "-f", "qcow2"]
    if shrink:
        argv.append("--shrink")
    run([*argv, path, str(size)], limits=INFO_LIMITS)


def convert(
    src: str,
    src_fmt: str,
    dst: str,
    dst_fmt: str,
    *,
    progress: ProgressFn | None = None,
    total: int = 0,
) -> None:
    """Copy the guest-visible content of ``src`` (whole backing chain) into a new ``dst``.

    Holes and zero ranges are skipped, so the cost follows allocated data.
    """
    convert_opts(src, src_fmt, dst, dst_fmt, progress=progress, total=total)


def image_opts(options: dict[str, str]) -> str:
    """A ``--image-opts`` string; commas in values are doubled as QEMU wants."""
    return ",".join(f"{k}={str(v).replace(',', ',,')}" for k, v in options.items())


def convert_opts(
    src: str | dict[str, str],
    src_fmt: str,
    dst: str | dict[str, str],
    dst_fmt: str,
    *,
    progress: ProgressFn | None = None,
    total: int = 0,
) -> None:
    """Like ``convert``, where either side may be a protocol (``{'driver': 'rbd', ...}``).

    A protocol source is read as ``src_fmt``; a protocol target must exist already
    (``-n``) and is written as ``dst_fmt``. Zero ranges are skipped on the target.
    """
    argv = [binary(), "convert"]
    if isinstance(src, dict):
        argv += ["--image-opts"]
        src_arg = image_opts({"driver": src_fmt, **{f"file.{k}": v for k, v in src.items()}})
    else:
        argv += ["-f", src_fmt]
        src_arg = src
    if isinstance(dst, dict):
        argv += ["-n", "--target-image-opts"]
        dst_arg = image_opts({"driver": dst_fmt, **{f"file.{k}": v for k, v in dst.items()}})
    else:
        argv += ["-O", dst_fmt]
        if dst_fmt == "qcow2":
            argv += ["-o", "cluster_size=65536"]
        dst_arg = dst
    if progress is not None:
        argv.append("-p")
    argv += [src_arg, dst_arg]

    def on_line(line: str) -> None:
        match = _PROGRESS_RE.search(line)
        if match and progress is not None:
            progress(Progress(int(float(match.group(1)) / 100 * total), total))

    protocol = isinstance(src, dict) or isinstance(dst, dict)
    limits = PROTOCOL_LIMITS if protocol else COPY_LIMITS
    run(argv, limits=limits, on_line=on_line if progress else None)


def commit(path: str) -> None:
    """Write the overlay ``path``'s own data into its backing file; the overlay stays intact."""
    run([binary(), "commit", "-q", "-d", "-f", "qcow2", path], limits=COPY_LIMITS)


def bitmap(path: str, name: str, *, add: bool) -> None:
    """Add (enabled, persistent) or remove the dirty bitmap ``name`` of a qcow2 file."""
    ops = ["--add", "--enable"] if add else ["--remove"]
    run([binary(), "bitmap", *ops, "-f", "qcow2", path, name], limits=INFO_LIMITS)


def bitmaps(path: str) -> dict[str, list[str]]:
    """The qcow2 file's own persistent dirty bitmaps: name -> flags (``auto`` = enabled,
    ``in-use`` = not stored cleanly, so inconsistent when no process has it open)."""
    data = info(path, "qcow2").get("format-specific", {}).get("data", {})
    return {str(b["name"]): list(b.get("flags", [])) for b in data.get("bitmaps", [])}


def rebase(path: str, backing: str | None, *, safe: bool) -> None:
    """Point ``path`` at another backing file (``None``: none).

    ``safe`` copies whatever differs between the old and the new backing into
    ``path`` so its content stays the same; unsafe only rewrites the header.
    """
    argv = [binary(), "rebase", "-q", "-f", "qcow2"]
    if not safe:
        argv.append("-u")
    if backing is None:
        argv += ["-b", ""]
    else:
        argv += ["-b", backing, "-F", "qcow2"]
    run([*argv, path], limits=COPY_LIMITS)


def map_extents(path: str, fmt: str) -> list[Extent]:
    out = run([binary(), "map", "--output=json", "-U", "-f", fmt, path], limits=INFO_LIMITS).stdout
    try:
        rows: Any = json.loads(out)
    except ValueError as exc:
        raise StorageError(f"qemu-img map gave unreadable output for {path}") from exc
    return [
        Extent(
            int(r["start"]),
            int(r["length"]),
            bool(r["data"]),
            int(r.get("depth", 0)),
            int(r["offset"]) if "offset" in r else None,
        )
        for r in rows
    ]


def check(path: str) -> None:
    """Raise when ``qemu-img check`` finds the qcow2 file damaged or leaking clusters."""
    res = run(
        [binary(), "check", "-q", "--output=json", "-f", "qcow2", path],
        limits=INFO_LIMITS,
        check=False,
    )
    if res.returncode != 0:
        raise StorageError(
            f"qemu-img check finds {path} inconsistent (exit {res.returncode}): "
            f"{res.stdout.strip()[:500]}"
        )


def compare(a: str, a_fmt: str, b: str, b_fmt: str) -> bool:
    """True when both images read the same (sizes included)."""
    res = run(
        [binary(), "compare", "-q", "-s", "-f", a_fmt, "-F", b_fmt, a, b],
        limits=COPY_LIMITS,
        check=False,
    )
    if res.returncode in (0, 1):
        return res.returncode == 0
    raise StorageError(f"qemu-img compare failed: {res.stderr.strip()}")
