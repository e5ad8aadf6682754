"""The backup's own qcow2 mapper must say what ``qemu-img map`` says, cluster by
cluster, on chains QEMU wrote (data, zero and compressed clusters, discards, a
raw base, a larger overlay, small and large clusters), and leave to QEMU every
file it does not expect."""

from __future__ import annotations

import itertools
import random
import subprocess
from pathlib import Path

import pytest

from snapback.domain.errors import StorageError
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.imagefmt.qcow2_header import Unreadable, read_header
from snapback.drivers.imagefmt.qcow2_map import Qcow2Chain
from snapback.drivers.storage.local.direct import MappedReader, open_read_only
from snapback.drivers.storage.nbd import NbdHandle

MIB = 1 << 20


def create(
    path: Path, size: str, *opts: str, backing: Path | None = None, fmt: str = "qcow2"
) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", backing.name, "-F", fmt]
    for o in opts:
        argv += ["-o", o]
    subprocess.run([*argv, str(path), size], check=True, cwd=path.parent)


def qemu_io(path: Path, fmt: str, commands: list[str]) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, cwd=path.parent)


def scribble(path: Path, size: int, seed: int, fmt: str = "qcow2", cluster: int = 65536) -> None:
    """Random writes, zero writes, discards and (qcow2) compressed writes."""
    rng = random.Random(seed)
    cmds, touched = [], set()
    for _ in range(40):
        off = rng.randrange(0, size // cluster) * cluster
        n = min(rng.randrange(1, 6) * cluster, size - off)
        op = rng.choice(["write", "write", "zero", "discard", "compressed"] if fmt == "qcow2"
                        else ["write"])  # fmt: skip
        pattern = rng.randrange(1, 255)
        if op == "compressed" and off in touched:
            op = "zero"  # QEMU writes compressed clusters only where none is allocated
        touched.update(range(off - off % cluster, off + n + 2 * cluster, cluster))
        if op == "write":
            cmds.append(f"write -P {pattern} {off + rng.randrange(0, cluster // 2)} {n // 2 + 1}")
        elif op == "zero":
            cmds.append(f"write -z {off} {n}")
        elif op == "discard":
            cmds.append(f"discard {off} {n}")
        else:
            cmds.append(f"write -c -P {pattern} {off} {cluster}")
    qemu_io(path, fmt, cmds)


def per_cluster(extents: list[qemu_img.Extent], size: int, step: int) -> list[tuple[object, ...]]:
    """(reads as data?, layer, host offset) for every ``step`` of the disk; the layer and
    offset only where data is read from a file (None offset: compressed)."""
    out: list[tuple[object, ...]] = []
    for e in extents:
        for pos in range(e.start, e.start + e.length, step):
            if not e.data:
                out.append((False,))
            elif e.offset is None:
                out.append((True, None))
            else:
                out.append((True, e.depth, e.offset + pos - e.start))
    assert len(out) == size // step
    return out


def assert_same_map(top: Path, size: int, step: int) -> None:
    chain = Qcow2Chain(str(top))
    try:
        assert chain.size == size
        ours = per_cluster(chain.extents(0, size), size, step)
        theirs = per_cluster(qemu_img.map_extents(str(top), "qcow2"), size, step)
        # Where QEMU reads data, the same layer and offset; where it sees zeroes, ours
        # may name a data cluster instead: QEMU also asks the file system, and the
        # unwritten part of a cluster it allocated is a hole (the reads below match).
        assert sum(1 for t in theirs if t[0]) > len(theirs) // 10  # the test has data
        for n, (o, t) in enumerate(zip(ours, theirs, strict=True)):
            assert o == t or (not t[0] and o[0] and o[1] is not None), n * step
        rng = random.Random(1)
        for _ in range(50):  # any range: covered exactly, from its first byte
            start = rng.randrange(size)
            part = chain.extents(start, rng.randrange(1, 5 * MIB))
            assert part[0].start == start
            assert all(a.start + a.length == b.start for a, b in itertools.pairwise(part))
    finally:
        chain.close()
    mapped, nbd = open_read_only(str(top)), NbdHandle(str(top), read_only=True)
    try:
        assert isinstance(mapped, MappedReader)
        assert mapped.read(0, size) == nbd.read(0, size)
    finally:
        mapped.close()
        nbd.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_three_layer_chain_maps_as_qemu_maps_it(tmp_path: Path, seed: int) -> None:
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    create(base, "24M")
    scribble(base, 24 * MIB, seed)
    create(mid, "24M", backing=base)
    scribble(mid, 24 * MIB, seed + 10)
    create(top, "32M", backing=mid)  # larger than its backing: past 24M reads zeroes
    scribble(top, 32 * MIB, seed + 20)
    assert_same_map(top, 32 * MIB, 4096)


def test_a_raw_base_maps_as_qemu_maps_it(tmp_path: Path) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    subprocess.run(["truncate", "-s", "16M", str(base)], check=True)
    scribble(base, 16 * MIB, 4, fmt="raw")
    create(top, "16M", backing=base, fmt="raw")
    scribble(top, 16 * MIB, 5)
    chain = Qcow2Chain(str(top))
    try:  # qemu-img map asks the file system where a raw file has holes; we read them
        assert len(chain.layers) == 2 and chain.layers[1].head is None
    finally:
        chain.close()
    mapped, nbd = open_read_only(str(top)), NbdHandle(str(top), read_only=True)
    try:
        assert mapped.read(0, 16 * MIB) == nbd.read(0, 16 * MIB)
    finally:
        mapped.close()
        nbd.close()


@pytest.mark.parametrize("cluster", [512, 2 * MIB])
def test_small_and_large_clusters_map_as_qemu_maps_them(tmp_path: Path, cluster: int) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    size = 4 * MIB if cluster == 512 else 40 * MIB
    create(base, str(size), f"cluster_size={cluster}")
    scribble(base, size, 6, cluster=cluster)
    create(top, str(size), backing=base)  # 64 KiB clusters over the other size
    scribble(top, size, 7)
    assert_same_map(top, size, min(cluster, 4096))


@pytest.mark.parametrize(
    "opts", [["compat=0.10"], ["extended_l2=on"], ["data_file={}/data.raw", "data_file_raw=on"]]
)
def test_files_it_does_not_expect_are_left_to_qemu(tmp_path: Path, opts: list[str]) -> None:
    top = tmp_path / "odd.qcow2"
    create(top, "8M", *(o.format(tmp_path) for o in opts))
    qemu_io(top, "qcow2", ["write -P 5 1M 2M", "write -z 4M 1M"])
    with pytest.raises(Unreadable):
        Qcow2Chain(str(top))
    handle, nbd = open_read_only(str(top)), NbdHandle(str(top), read_only=True)
    try:  # still read right: through qemu-img map, or qemu-nbd for an external data file
        assert handle.read(0, 8 * MIB) == nbd.read(0, 8 * MIB)
    finally:
        handle.close()
        nbd.close()


def test_a_backing_file_named_by_a_protocol_is_left_to_qemu(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, "8M")
    create(top, "8M", backing=base)
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", f"file:{base}", "-F", "qcow2", str(top)],
        check=True,
    )
    with pytest.raises(Unreadable, match="not a plain file name"):
        Qcow2Chain(str(top))


def test_an_l2_entry_with_reserved_bits_is_an_error_not_a_guess(tmp_path: Path) -> None:
    top = tmp_path / "bad.qcow2"
    create(top, "8M")
    qemu_io(top, "qcow2", ["write -P 9 0 64k"])
    with open(top, "r+b") as f:
        head = read_header(f.fileno())
        f.seek(head.l1_offset)
        l2 = int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        entry = int.from_bytes(f.read(8), "big")
        f.seek(l2)
        f.write((entry | 1 << 4).to_bytes(8, "big"))  # a reserved bit of the first entry
    handle = open_read_only(str(top))
    try:
        assert isinstance(handle, MappedReader)
        with pytest.raises(StorageError, match="reserved bits"):
            handle.read(0, 4096)
    finally:
        handle.close()
