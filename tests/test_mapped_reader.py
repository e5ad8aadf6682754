"""The local pool's read-only handle reads data clusters straight from the layer
files at the offsets ``qemu-img map`` gives: it must read exactly what QEMU
reads, across a backing chain, zero clusters, holes and compressed clusters, also
while a backup's qemu-img adds a dirty bitmap to the head."""

from __future__ import annotations

import contextlib
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snapback.domain.errors import StorageError, ToolFailed
from snapback.drivers.imagefmt import qcow2_bitmaps, qemu_img
from snapback.drivers.storage.base import BlockHandle
from snapback.drivers.storage.local import tracking
from snapback.drivers.storage.local.direct import MappedReader, open_read_only
from snapback.drivers.storage.nbd import NbdHandle

MIB = 1 << 20


def qemu_io(path: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def read_at_once(
    handle: BlockHandle, spans: list[tuple[int, int]], threads: int = 4
) -> list[bytes]:
    """Each (offset, length) of ``handle``, read by ``threads`` threads at once."""

    def read(span: tuple[int, int]) -> bytes:
        buf = bytearray(span[1])
        handle.read_into(span[0], buf)
        return bytes(buf)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(read, spans))


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "48M"], check=True)
    qemu_io(base, "write -P 1 0 3M", "write -c -P 2 4M 1M", "write -P 7 20M 5M")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top)],
        check=True,
        cwd=tmp_path,
    )
    qemu_io(top, "write -P 3 512k 1M", "write -z 21M 1M", "write -P 9 47M 1M")
    return top


def test_mapped_reads_equal_qemu_reads(chain: Path) -> None:
    mapped = open_read_only(str(chain))
    nbd = NbdHandle(str(chain), read_only=True)
    try:
        assert isinstance(mapped, MappedReader)
        assert mapped.size == nbd.size == 48 * MIB
        assert mapped.read(0, mapped.size) == nbd.read(0, nbd.size)
        rng = random.Random(5)
        for _ in range(200):
            off = rng.randrange(mapped.size)
            n = rng.randrange(min(6 * MIB, mapped.size - off) + 1)
            assert mapped.read(off, n) == nbd.read(off, n), (off, n)
        assert mapped.read(4 * MIB, 4096) == b"\x02" * 4096  # compressed: through QEMU
        assert mapped.read(21 * MIB, 8) == bytes(8)  # zero cluster over data below
    finally:
        mapped.close()
        nbd.close()


def test_mapped_reads_from_many_threads_at_once_equal_qemu_reads(chain: Path) -> None:
    """A backup's workers read the handle at once (``parallel_reads``); the first
    reads of compressed clusters race to open the one qemu-nbd export."""
    mapped = open_read_only(str(chain))
    nbd = NbdHandle(str(chain), read_only=True)
    try:
        assert mapped.parallel_reads
        want = nbd.read(0, nbd.size)
        spans = [(i * MIB, 2 * MIB) for i in range(3, 47)] * 2  # 4M: compressed, read often
        for (off, n), data in zip(spans, read_at_once(mapped, spans, 8), strict=True):
            assert data == want[off : off + n], off
    finally:
        mapped.close()
        nbd.close()


def test_mapped_reader_refuses_writes_and_ranges_outside(chain: Path) -> None:
    with open_read_only(str(chain)) as h:
        with pytest.raises(StorageError, match="read-only"):
            h.write(0, b"x")
        with pytest.raises(StorageError, match="outside the volume"):
            h.read(h.size - 10, 11)


def test_a_layer_cut_short_is_an_error_not_zeroes(chain: Path) -> None:
    with open_read_only(str(chain)) as h:
        base = chain.parent / "base.qcow2"
        with open(base, "r+b") as f:  # the base's data lies at its end: cut it off
            f.truncate(base.stat().st_size - 2 * MIB)
        with pytest.raises(StorageError, match="shorter than its map"):
            h.read(20 * MIB, 5 * MIB)


def test_a_bitmap_started_while_the_head_is_read(chain: Path) -> None:
    """A backup of a stopped volume starts its bitmap with qemu-img while it reads the
    head (``tracking.open_tracking``): threads read what QEMU reads, the compressed
    range too (its qemu-nbd waits for qemu-img: they would not share the file's
    lock); after the close the bitmap is there, stored cleanly, and marks writes."""
    with NbdHandle(str(chain), read_only=True) as nbd:
        want = nbd.read(0, nbd.size)
    with (
        contextlib.ExitStack() as waits,  # closed after the handle: waits for qemu-img
        tracking.open_tracking(chain, "snapback-t", waits) as handle,
    ):
        assert handle.parallel_reads and handle.size == 48 * MIB
        assert handle.read(4 * MIB, 4096) == b"\x02" * 4096  # compressed: qemu-img runs
        spans = [(i * MIB, 2 * MIB) for i in range(47)]
        for (off, n), data in zip(spans, read_at_once(handle, spans), strict=True):
            assert data == want[off : off + n], off
    assert qemu_img.bitmaps(str(chain)) == {"snapback-t": ["auto"]}
    subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(chain)], check=True)
    qemu_io(chain, "write -P 5 30M 64k")
    assert qcow2_bitmaps.dirty_ranges(str(chain), "snapback-t") == [(30 * MIB, 64 << 10)]


def test_a_bitmap_that_cannot_start_fails_the_close_not_the_reads(chain: Path) -> None:
    name = "snapback-" + "x" * 1100  # QEMU refuses names over 1023 bytes
    with (
        pytest.raises(ToolFailed, match="qemu-img"),
        contextlib.ExitStack() as waits,
        tracking.open_tracking(chain, name, waits) as handle,
    ):
        assert handle.read(20 * MIB, MIB) == b"\x07" * MIB
        with pytest.raises(StorageError, match="read-only"):
            handle.write(0, b"x")
    assert qemu_img.bitmaps(str(chain)) == {}
