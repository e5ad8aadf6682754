"""A restore writes the new volume's qcow2 file itself (drivers/storage/local/fresh.py):
QEMU must read back exactly what was written, ``qemu-img check`` must find the
file clean, and the local pool must refuse the fast path on a volume that holds
anything already."""

from __future__ import annotations

import random
import subprocess
import threading
from pathlib import Path

import pytest

from snapback.domain.errors import Conflict, StorageError
from snapback.drivers.storage.local.fresh import FreshQcow2
from snapback.drivers.storage.local.pool import LocalPool
from snapback.drivers.storage.nbd import NbdHandle

MIB = 1 << 20


def expected(writes: list[tuple[int, bytes]], off: int, n: int) -> bytes:
    out = bytearray(n)
    for o, d in writes:
        lo, hi = max(o, off), min(o + len(d), off + n)
        if lo < hi:
            out[lo - off : hi - off] = d[lo - o : hi - o]
    return bytes(out)


def new_file(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "v.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return path


def test_what_is_written_is_what_qemu_reads(tmp_path: Path) -> None:
    size = 1100 * MIB + 7 * 512  # three L2 regions, an odd end
    path = new_file(tmp_path, size)
    rng = random.Random(3)
    writes: list[tuple[int, bytes]] = []
    handle = FreshQcow2(str(path), size)
    lock = threading.Lock()

    quarter = size // 4

    def writer(seed: int) -> None:  # four threads at once, each in its own quarter
        r = random.Random(seed)
        for _ in range(60):
            off = seed * quarter + r.randrange(quarter)
            room = (seed + 1) * quarter - off
            n = min(room, r.choice([1, 511, 4096, 64 << 10, 4 * MIB, r.randrange(1, 300_000)]))
            data = r.randbytes(n)
            handle.write(off, data)
            with lock:
                writes.append((off, data))

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handle.write(size - 512, b"e" * 512)
    writes.append((size - 512, b"e" * 512))
    for o, d in writes[:30]:
        assert handle.read(o, len(d)) == expected(writes, o, len(d))
    handle.close()
    report = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stdout
    nbd = NbdHandle(str(path), read_only=True)
    try:
        assert nbd.size == size
        for o, d in writes:
            assert nbd.read(o, len(d)) == expected(writes, o, len(d))
        for _ in range(100):
            off = rng.randrange(size)
            n = rng.randrange(min(3 * MIB, size - off) + 1)
            assert nbd.read(off, n) == expected(writes, off, n), (off, n)
    finally:
        nbd.close()


def test_nothing_written_is_an_empty_clean_image(tmp_path: Path) -> None:
    path = new_file(tmp_path, 64 * MIB)
    FreshQcow2(str(path), 64 * MIB).close()
    info = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert '"data": true' not in info


def test_writes_outside_or_after_close_are_refused(tmp_path: Path) -> None:
    path = new_file(tmp_path, 8 * MIB)
    handle = FreshQcow2(str(path), 8 * MIB)
    with pytest.raises(StorageError, match="outside"):
        handle.write(8 * MIB - 1, b"ab")
    handle.close()
    with pytest.raises(StorageError, match="closed"):
        handle.write(0, b"a")


def test_pool_refuses_the_fast_path_on_a_volume_with_data(tmp_path: Path) -> None:
    pool = LocalPool(tmp_path / "pool", "p")
    pool.create_volume("used", 8 * MIB)
    with pool.open("used") as h:
        h.write(MIB, b"keep")
    with pytest.raises(Conflict, match="not new and empty"):
        pool.open_new("used")
    with pool.open("used", read_only=True) as h:
        assert h.read(MIB, 4) == b"keep"  # untouched
    pool.create_volume("new", 8 * MIB)
    with pool.open_new("new") as h:
        h.write(2 * MIB, b"x" * 65536)
    with pool.open("new", read_only=True) as h:
        assert h.read(2 * MIB - 1, 65538) == b"\0" + b"x" * 65536 + b"\0"


def test_buffers_are_written_from_where_they_are_and_the_reserve_is_cut_off(
    tmp_path: Path,
) -> None:
    """A restore worker's page-aligned buffer goes to the file as it is (O_DIRECT);
    other views are copied first; space reserved ahead of the data does not stay."""
    from snapback.drivers.buffers import BufferPool

    size = 1 << 30
    path = new_file(tmp_path, size)
    handle = FreshQcow2(str(path), size)
    aligned = BufferPool(4 * MIB, keep=1).take()
    aligned[:] = random.Random(5).randbytes(4 * MIB)
    handle.write_view(8 * MIB, aligned[64 << 10 : 2 * MIB])  # aligned memory, whole clusters
    handle.write_view(900 * MIB + 3, memoryview(b"odd" * 1000))  # read-only, unaligned
    handle.close()
    assert path.stat().st_size < 3 * MIB  # header, 2 MiB and a bit, the tables
    assert path.stat().st_blocks * 512 < 3 * MIB
    nbd = NbdHandle(str(path), read_only=True)
    try:
        assert nbd.read(8 * MIB, 2 * MIB - (64 << 10)) == bytes(aligned[64 << 10 : 2 * MIB])
        assert nbd.read(900 * MIB, 3003) == b"\0\0\0" + b"odd" * 1000
        assert nbd.read(0, 8 * MIB) == bytes(8 * MIB)
    finally:
        nbd.close()
