"""A corpus of hostile and malformed disk images, made with real qemu-img plus byte patches."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

MIB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def good_qcow2(path: Path, data_mib: int = 2) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data_mib}M", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def patch(path: Path, offset: int, fmt: str, value: int) -> Path:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    return path


def pad_to_sector(path: Path) -> Path:
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * (-size % 512 or 0))
    return path


def _backing_host_file(d: Path) -> Path:
    p = d / "backing-host.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(p), "1M")
    return p


def _backing_json(d: Path) -> Path:
    p = d / "backing-json.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        'json:{"driver":"file","filename":"/etc/shadow"}',
        "-F",
        "raw",
        str(p),
        "1M",
    )
    return p


def _data_file(d: Path) -> Path:
    p = d / "data-file.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"data_file={d / 'outside.raw'},data_file_raw=on",
        str(p),
        "1M",
    )
    return p


def _vmdk_descriptor(d: Path) -> Path:
    p = d / "descriptor.vmdk"
    p.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\nRW 2048 FLAT "/etc/passwd" 0\n'
    )
    return pad_to_sector(p)


def _vmdk_sparse(d: Path) -> Path:
    p = d / "sparse.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(p), "1M")
    return p


def _other(fmt: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = d / f"image.{fmt}"
        qemu_img("create", "-q", "-f", fmt, str(p), "1M")
        return pad_to_sector(p)

    return make


def _huge_l1(d: Path) -> Path:
    return patch(good_qcow2(d / "huge-l1.qcow2"), 36, ">I", 0x1000_0000)


def _unknown_feature(d: Path) -> Path:
    return patch(good_qcow2(d / "unknown-feature.qcow2"), 72, ">Q", 1 << 10)


def _encrypted(d: Path) -> Path:
    return patch(good_qcow2(d / "encrypted.qcow2"), 32, ">I", 1)


def _absurd_size(d: Path) -> Path:
    return patch(good_qcow2(d / "absurd-size.qcow2"), 24, ">Q", 1 << 62)


def _size_not_in_sectors(d: Path) -> Path:
    """QEMU would round 16 MiB - 1 down to whole sectors: another size than declared."""
    return patch(good_qcow2(d / "odd-size.qcow2"), 24, ">Q", (16 << 20) - 1)


def _huge_refcount_table(d: Path) -> Path:
    return patch(good_qcow2(d / "huge-reftable.qcow2"), 56, ">I", 1 << 20)


def _l1_past_end(d: Path) -> Path:
    return patch(good_qcow2(d / "l1-past-end.qcow2"), 40, ">Q", 1 << 40)


def _version_1(d: Path) -> Path:
    return patch(good_qcow2(d / "qcow1.qcow2"), 4, ">I", 1)


def _not_a_disk(d: Path) -> Path:
    p = d / "notes.txt"
    p.write_text("this is not a disk image\n")
    return p


def _empty(d: Path) -> Path:
    p = d / "empty.raw"
    p.touch()
    return p


def _luks(d: Path) -> Path:
    p = d / "luks.img"
    p.write_bytes(b"LUKS\xba\xbe\x00\x02" + b"\0" * 1016)
    return p


HOSTILE: dict[str, Callable[[Path], Path]] = {
    "backing file pointing at a host file": _backing_host_file,
    "json: backing file": _backing_json,
    "external data file": _data_file,
    "VMDK descriptor pointing outside": _vmdk_descriptor,
    "VMDK sparse": _vmdk_sparse,
    "VHD": _other("vpc"),
    "VHDX": _other("vhdx"),
    "VDI": _other("vdi"),
    "QED": _other("qed"),
    "LUKS": _luks,
    "huge L1 table": _huge_l1,
    "unknown incompatible feature": _unknown_feature,
    "encrypted qcow2": _encrypted,
    "absurd virtual size": _absurd_size,
    "virtual size not in whole sectors": _size_not_in_sectors,
    "huge refcount table": _huge_refcount_table,
    "L1 table past the end": _l1_past_end,
    "qcow version 1": _version_1,
    "text file": _not_a_disk,
    "empty file": _empty,
}


def truncations(d: Path) -> list[Path]:
    """A good qcow2 cut at every cluster boundary below its full size."""
    src = good_qcow2(d / "whole.qcow2", data_mib=1)
    data = src.read_bytes()
    cluster = 65536
    out = []
    for n in range(1, len(data) // cluster + (1 if len(data) % cluster else 0)):
        p = d / f"truncated-{n}.qcow2"
        p.write_bytes(data[: n * cluster])
        out.append(p)
    return out
