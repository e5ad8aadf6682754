"""The StoragePool contract: what every driver must do, checked on real storage."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from pathlib import Path

import pytest

from snapback.domain.errors import Conflict, HasDependents, InvalidInput, NotFound
from snapback.domain.models import DiskFormat
from snapback.drivers.imagefmt.inspector import inspect
from snapback.drivers.storage.base import StoragePool
from tests.contract.conftest import PoolFactory

MIB = 1 << 20
SIZE = 32 * MIB


def unit(pool: StoragePool) -> int:
    """Allocation granularity: qcow2 clusters (plus metadata) locally, whole objects on RBD."""
    return 4 * MIB if pool.driver == "rbd" else MIB


def digest(pool: StoragePool, volume: str, snapshot: str | None = None) -> str:
    h = hashlib.sha256()
    with pool.open(volume, snapshot=snapshot) as handle:
        for off in range(0, handle.size, 4 * MIB):
            h.update(handle.read(off, min(4 * MIB, handle.size - off)))
    return h.hexdigest()


def write(pool: StoragePool, volume: str, offset: int, data: bytes) -> None:
    with pool.open(volume) as handle:
        handle.write(offset, data)


def read(
    pool: StoragePool, volume: str, offset: int, length: int, snapshot: str | None = None
) -> bytes:
    with pool.open(volume, snapshot=snapshot) as handle:
        return handle.read(offset, length)


def test_create_show_list(pool: StoragePool) -> None:
    info = pool.create_volume("v1", SIZE)
    assert info.size == SIZE and info.parent is None
    assert info.allocated < 2 * MIB, "a new volume must be thin"
    assert "v1" in pool.list_volumes()
    with pytest.raises(Conflict):
        pool.create_volume("v1", SIZE)
    with pytest.raises(NotFound):
        pool.volume_info("nope")


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "x\x00", "x" * 200])
def test_bad_names_refused(pool: StoragePool, bad: str) -> None:
    with pytest.raises(InvalidInput):
        pool.create_volume(bad, SIZE)


def test_write_read_and_allocation(pool: StoragePool) -> None:
    pool.create_volume("v", SIZE)
    write(pool, "v", 3 * MIB, b"x" * MIB)
    assert read(pool, "v", 3 * MIB, 4) == b"xxxx"
    assert read(pool, "v", 0, 4) == b"\0" * 4
    assert MIB <= pool.volume_info("v").allocated < 2 * MIB + unit(pool)


def test_resize(pool: StoragePool) -> None:
    pool.create_volume("v", SIZE)
    write(pool, "v", SIZE - 4096, b"t" * 4096)
    assert pool.resize_volume("v", 2 * SIZE).size == 2 * SIZE
    assert read(pool, "v", SIZE - 4096, 4) == b"tttt"
    assert read(pool, "v", 2 * SIZE - 4096, 4) == b"\0" * 4
    with pytest.raises(InvalidInput, match="allow-shrink"):
        pool.resize_volume("v", SIZE // 2)
    assert pool.volume_info("v").size == 2 * SIZE
    assert pool.resize_volume("v", SIZE // 2, allow_shrink=True).size == SIZE // 2


def test_snapshot_freezes_content_without_copying(pool: StoragePool) -> None:
    pool.create_volume("v", SIZE)
    write(pool, "v", 0, b"a" * (8 * MIB))
    before = pool.volume_info("v").allocated
    snap = pool.create_snapshot("v", "s1")
    assert snap.name == "s1" and not snap.protected and snap.size == SIZE
    assert pool.volume_info("v").allocated - before < MIB, "a snapshot must not copy data"
    write(pool, "v", 0, b"b" * MIB)
    assert read(pool, "v", 0, 2, snapshot="s1") == b"aa"
    assert read(pool, "v", 0, 2) == b"bb"
    assert [s.name for s in pool.list_snapshots("v")] == ["s1"]
    with pytest.raises(Conflict):
        pool.create_snapshot("v", "s1")
    with pytest.raises(NotFound):
        pool.rollback_snapshot("v", "nope")


def test_rollback_gives_back_exact_bytes(pool: StoragePool) -> None:
    pool.create_volume("v", SIZE)
    write(pool, "v", 5 * MIB, b"original" * 1000)
    pool.create_snapshot("v", "s1")
    expected = digest(pool, "v")
    write(pool, "v", 5 * MIB, b"changed!" * 1000)
    write(pool, "v", 20 * MIB, b"new" * 1000)
    pool.resize_volume("v", 2 * SIZE)
    pool.rollback_snapshot("v", "s1")
    assert digest(pool, "v") == expected
    assert pool.volume_info("v").size == SIZE
    pool.rollback_snapshot("v", "s1")  # twice in a row is fine
    assert digest(pool, "v") == expected


def test_deleting_snapshots_keeps_what_others_read(pool: StoragePool) -> None:
    pool.create_volume("v", SIZE)
    sums = {}
    for i, name in enumerate(["s1", "s2", "s3"]):
        write(pool, "v", i * MIB, bytes([65 + i]) * MIB)
        pool.create_snapshot("v", name)
        sums[name] = digest(pool, "v", name)
    write(pool, "v", 10 * MIB, b"head" * 1000)
    head = digest(pool, "v")
    pool.delete_snapshot("v", "s2")  # a middle layer with one child
    assert digest(pool, "v", "s3") == sums["s3"] and digest(pool, "v") == head
    pool.rollback_snapshot("v", "s1")  # s1's layer now has two children: s3's and the head
    write(pool, "v", 12 * MIB, b"branch" * 100)
    branch = digest(pool, "v")
    pool.delete_snapshot("v", "s1")
    assert digest(pool, "v", "s3") == sums["s3"]
    assert digest(pool, "v") == branch
    pool.delete_snapshot("v", "s3")
    assert digest(pool, "v") == branch
    assert pool.list_snapshots("v") == []
    assert pool.find_debris() == []


def test_protection_and_clone_rules(make_pool: PoolFactory) -> None:
    pool, other = make_pool("vols"), make_pool("others")
    pool.create_volume("base", SIZE)
    write(pool, "base", 0, b"parent" * 100)
    pool.create_snapshot("base", "gold")
    with pytest.raises(InvalidInput, match="protect"):
        pool.clone("base", "gold", pool, "c1")
    pool.protect_snapshot("base", "gold")
    with pytest.raises(Conflict):
        pool.delete_snapshot("base", "gold")
    c1 = pool.clone("base", "gold", pool, "c1")
    pool.clone("base", "gold", other, "c2")
    assert c1.allocated < 2 * MIB and c1.size == SIZE
    assert str(pool.parent("c1")) == "vols/base@gold"
    assert pool.children("base", "gold") == ["others/c2", "vols/c1"]
    write(pool, "c1", 4 * MIB, b"child" * 100)
    write(pool, "base", 0, b"PARENT" * 100)
    assert read(pool, "c1", 0, 6) == b"parent" and read(pool, "c1", 4 * MIB, 5) == b"child"
    assert read(other, "c2", 0, 6) == b"parent" and read(other, "c2", 4 * MIB, 5) == b"\0" * 5
    with pytest.raises(HasDependents) as err:
        pool.unprotect_snapshot("base", "gold")
    assert err.value.dependents == ["others/c2", "vols/c1"]
    with pytest.raises(HasDependents, match="vols/c1"):
        pool.delete_volume("base")
    assert pool.list_snapshots("base")[0].children == ("others/c2", "vols/c1")
    other.delete_volume("c2")
    assert pool.children("base", "gold") == ["vols/c1"]


class Hold:
    """An ``around`` that counts its entries and exits, and can refuse to be entered."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse, self.entered, self.left = refuse, 0, 0

    def __enter__(self) -> None:
        if self.refuse:
            raise RuntimeError("the guest agent does not answer")
        self.entered += 1

    def __exit__(self, *exc: object) -> None:
        self.left += 1


def test_a_snapshot_taken_protected_inside_a_hold(pool: StoragePool) -> None:
    pool.create_volume("held", SIZE)
    write(pool, "held", MIB, b"before" * 100)
    hold = Hold()
    info = pool.create_snapshot("held", "gold", protect=True, around=hold)
    assert (hold.entered, hold.left) == (1, 1)
    assert info.protected and [s.protected for s in pool.list_snapshots("held")] == [True]
    with pytest.raises(Conflict):
        pool.delete_snapshot("held", "gold")
    write(pool, "held", MIB, b"after!" * 100)
    assert read(pool, "held", MIB, 6, snapshot="gold") == b"before"
    pool.clone("held", "gold", pool, "held-child")  # protected: clonable at once
    assert read(pool, "held-child", MIB, 6) == b"before"
    # a hold that cannot be taken (the guest would not freeze): no snapshot at all
    with pytest.raises(RuntimeError, match="agent"):
        pool.create_snapshot("held", "silver", protect=True, around=Hold(refuse=True))
    assert [s.name for s in pool.list_snapshots("held")] == ["gold"]
    pool.create_snapshot("held", "silver")  # the name is free; unprotected by default
    assert {s.name: s.protected for s in pool.list_snapshots("held")} == {
        "gold": True,
        "silver": False,
    }


def test_snapshots_prepared_together_are_taken_in_one_hold(pool: StoragePool) -> None:
    """An instance's disks: every volume opened and every name checked first, then all
    snapshots taken inside one hold of the guest."""
    disks = ("d1", "d2")
    for name in disks:
        pool.create_volume(name, SIZE)
        write(pool, name, MIB, name.encode() * 3)
    pool.create_snapshot("d2", "taken")
    # a name already taken is refused on preparing, before any hold: nothing is made
    with pytest.raises(Conflict), contextlib.ExitStack() as stack:
        stack.enter_context(pool.prepare_snapshot("d1", "point"))
        stack.enter_context(pool.prepare_snapshot("d2", "taken"))
    with pool.prepare_snapshot("d1", "point"):
        pass  # prepared, never taken
    assert pool.list_snapshots("d1") == []
    hold = Hold()
    with contextlib.ExitStack() as stack:
        prepared = (pool.prepare_snapshot(d, "point", protect=True) for d in disks)
        takes = [stack.enter_context(p) for p in prepared]
        with hold:
            for take in takes:
                take()
    assert (hold.entered, hold.left) == (1, 1)
    for name in disks:
        write(pool, name, MIB, b"after!")
        assert pool.snapshot_info(name, "point").protected
        assert read(pool, name, MIB, 6, snapshot="point") == name.encode() * 3
        assert read(pool, name, MIB, 6) == b"after!"
    # an error once the first is taken: it exists, unprotected, so that the caller can
    # remove it; the second was never taken
    with pytest.raises(RuntimeError, match="boom"), contextlib.ExitStack() as stack:
        prepared = (pool.prepare_snapshot(d, "p2", protect=True) for d in disks)
        takes = [stack.enter_context(p) for p in prepared]
        takes[0]()
        raise RuntimeError("boom")
    assert not pool.snapshot_info("d1", "p2").protected
    pool.delete_snapshot("d1", "p2")
    with pytest.raises(NotFound):
        pool.snapshot_info("d2", "p2")
    assert [s.name for s in pool.list_snapshots("d2")] == ["taken", "point"]


def test_flatten_keeps_bytes_and_ends_dependency(pool: StoragePool) -> None:
    pool.create_volume("base", SIZE)
    write(pool, "base", 2 * MIB, b"p" * MIB)
    pool.create_snapshot("base", "gold")
    pool.protect_snapshot("base", "gold")
    pool.clone("base", "gold", pool, "c")
    write(pool, "c", 9 * MIB, b"c" * MIB)
    pool.create_snapshot("c", "c-snap")  # the clone has its own snapshot too
    write(pool, "c", 11 * MIB, b"d" * 4096)
    expected, snap_expected = digest(pool, "c"), digest(pool, "c", "c-snap")
    seen = []
    pool.flatten("c", progress=seen.append)
    assert pool.parent("c") is None
    assert pool.children("base", "gold") == []
    assert seen and seen[-1].done <= seen[-1].total
    pool.unprotect_snapshot("base", "gold")
    pool.delete_volume("base")
    assert digest(pool, "c") == expected
    assert digest(pool, "c", "c-snap") == snap_expected
    with pytest.raises(InvalidInput, match="no parent"):
        pool.flatten("c")


def test_export_and_import(pool: StoragePool, tmp_path: Path) -> None:
    pool.create_volume("v", SIZE)
    write(pool, "v", MIB, b"export-me" * 100)
    pool.create_snapshot("v", "s")
    write(pool, "v", MIB, b"later" * 100)
    raw, qcow, snap_raw = tmp_path / "v.raw", tmp_path / "v.qcow2", tmp_path / "s.raw"
    pool.export_volume("v", str(raw), DiskFormat.RAW)
    pool.export_volume("v", str(qcow), DiskFormat.QCOW2)
    pool.export_volume("v", str(snap_raw), DiskFormat.RAW, snapshot="s")
    assert raw.stat().st_size == SIZE
    with open(raw, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest(pool, "v")
    with open(snap_raw, "rb") as f:
        f.seek(MIB)
        assert f.read(9) == b"export-me"
    with pytest.raises(Conflict, match="overwrite"):
        pool.export_volume("v", str(raw), DiskFormat.RAW)
    for name, path in (("from-raw", raw), ("from-qcow", qcow)):
        pool.import_volume(name, str(path), inspect(str(path)))
        assert digest(pool, name) == digest(pool, "v")
    fmt = subprocess.run(
        ["qemu-img", "info", "--output=json", str(qcow)], capture_output=True, text=True, check=True
    ).stdout
    assert '"format": "qcow2"' in fmt


def test_delete_volume_rules(pool: StoragePool) -> None:
    pool.create_volume("v", SIZE)
    pool.create_snapshot("v", "plain")
    pool.create_snapshot("v", "guarded")
    pool.protect_snapshot("v", "guarded")
    with pytest.raises(HasDependents, match="v@guarded"):
        pool.delete_volume("v")
    assert "v" in pool.list_volumes()
    pool.unprotect_snapshot("v", "guarded")
    pool.delete_volume("v")
    assert "v" not in pool.list_volumes()
    with pytest.raises(NotFound):
        pool.delete_volume("v")
    assert pool.find_debris() == [] and pool.recover() == []


def test_large_reads_and_writes(pool: StoragePool) -> None:
    """Requests larger than a transport's maximum (NBD: 32 MiB) are split, not dropped."""
    pool.create_volume("big", 80 * MIB)
    data = bytes(range(256)) * (40 * MIB // 256)
    write(pool, "big", 8 * MIB, data)
    assert read(pool, "big", 8 * MIB, len(data)) == data


def test_a_handle_taking_parallel_reads_gives_each_thread_its_own_bytes(
    pool: StoragePool,
) -> None:
    """Backup workers read a snapshot from several threads when its handle says it can
    (local chains, RBD): every chunk read that way is the one a single reader gets,
    while the volume itself is being written."""
    from concurrent.futures import ThreadPoolExecutor

    pool.create_volume("v", SIZE)
    for n in range(SIZE // MIB):
        write(pool, "v", n * MIB, bytes([n + 1]) * (MIB - 512) + bytes(512))
    pool.create_snapshot("v", "s")
    write(pool, "v", 0, b"z" * SIZE)  # the live volume moves on; the snapshot does not
    with pool.open("v", snapshot="s") as handle:
        assert handle.parallel_reads, f"{pool.driver} snapshots are read by one thread"

        def chunk(n: int) -> bytes:
            buf = bytearray(MIB)
            handle.read_into(n * MIB, buf)
            return bytes(buf)

        with ThreadPoolExecutor(8) as workers:
            got = list(workers.map(chunk, [n % (SIZE // MIB) for n in range(4 * SIZE // MIB)]))
    for i, data in enumerate(got):
        n = i % (SIZE // MIB)
        assert data == bytes([n + 1]) * (MIB - 512) + bytes(512), n
