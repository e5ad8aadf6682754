"""Dirty bitmaps read from the qcow2 file itself (imagefmt/qcow2_bitmaps.py) give
exactly what QEMU gives: ``qemu-img info``'s flags and a qemu-nbd export's dirty
block status, for bitmaps QEMU wrote after real writes."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from snapback.drivers.imagefmt import qcow2_bitmaps, qemu_img
from snapback.drivers.storage.nbd import NbdHandle, dirty_extents

MIB = 1 << 20


def qimg(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_bitmaps_and_their_ranges_match_what_qemu_says(tmp_path: Path) -> None:
    path = tmp_path / "v.qcow2"
    size = 300 * MIB + 3 * 4096 + 512  # with 512 B granularity the bitmap needs 2 clusters
    qimg("create", "-q", "-f", "qcow2", str(path), str(size))
    qimg("bitmap", "--add", str(path), "coarse")  # 64 KiB granularity
    qimg("bitmap", "--add", "-g", "512", str(path), "fine")
    qimg("bitmap", "--add", "-g", "1M", str(path), "off")
    qimg("bitmap", "--disable", str(path), "off")
    rng = random.Random(7)
    h = NbdHandle(str(path), read_only=False)
    try:
        for _ in range(40):
            n = rng.choice([512, 4096, 65536, 3 * MIB, rng.randrange(1, 200_000)])
            off = rng.randrange(0, size - n)
            h.write(off, b"w" * n)
        h.write(256 * MIB - 512, b"x" * 1024)  # across the fine bitmap's cluster boundary
        h.write(size - 512, b"e" * 512)  # the odd end
    finally:
        h.close()
    ours = qcow2_bitmaps.read_bitmaps(str(path))
    assert {n: b.flags for n, b in ours.items()} == qemu_img.bitmaps(str(path))
    assert ours["fine"].granularity == 512 and ours["off"].flags == []
    for name in ("coarse", "fine", "off"):
        got = qcow2_bitmaps.dirty_ranges(str(path), name)
        assert got == dirty_extents(str(path), name), name
    assert qcow2_bitmaps.dirty_ranges(str(path), "off") == []
    assert len(qcow2_bitmaps.dirty_ranges(str(path), "fine")) > 30


def test_a_bitmap_left_in_use_by_a_killed_qemu_says_so(tmp_path: Path) -> None:
    path = tmp_path / "v.qcow2"
    qimg("create", "-q", "-f", "qcow2", str(path), "64M")
    qimg("bitmap", "--add", str(path), "b")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), str(path)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert qcow2_bitmaps.read_bitmaps(str(path))["b"].flags == ["in-use", "auto"]
    assert qemu_img.bitmaps(str(path))["b"] == ["in-use", "auto"]


def test_files_it_does_not_expect_are_left_to_qemu(tmp_path: Path) -> None:
    raw = tmp_path / "v.raw"
    raw.write_bytes(bytes(1 << 16))
    with pytest.raises(qcow2_bitmaps.Unreadable):
        qcow2_bitmaps.read_bitmaps(str(raw))
    v2 = tmp_path / "v2.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(v2), "8M")
    with pytest.raises(qcow2_bitmaps.Unreadable):
        qcow2_bitmaps.read_bitmaps(str(v2))
    plain = tmp_path / "plain.qcow2"
    qimg("create", "-q", "-f", "qcow2", str(plain), "8M")
    assert qcow2_bitmaps.read_bitmaps(str(plain)) == {}
    with pytest.raises(qcow2_bitmaps.Unreadable, match="no bitmap"):
        qcow2_bitmaps.dirty_ranges(str(plain), "b")
    qimg("bitmap", "--add", str(plain), "b")
    data = bytearray(plain.read_bytes())
    data[88:96] = bytes(8)  # autoclear bit off: an old writer touched the file
    plain.write_bytes(bytes(data))
    with pytest.raises(qcow2_bitmaps.Unreadable, match="inconsistent"):
        qcow2_bitmaps.read_bitmaps(str(plain))
