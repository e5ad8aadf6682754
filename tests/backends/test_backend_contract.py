"""The repository backend contract: what every store must do, on real storage."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from snapback.domain.errors import InvalidInput, NotFound
from snapback.repository.backends import Backend


def test_put_get_stat_delete(backend: Backend) -> None:
    assert backend.stat("chunks/ab/abc") is None and not backend.exists("chunks/ab/abc")
    assert backend.put("chunks/ab/abc", b"hello") is True
    assert backend.get("chunks/ab/abc") == b"hello"
    info = backend.stat("chunks/ab/abc")
    assert info is not None and info.size == 5 and abs(info.mtime - time.time()) < 120
    backend.delete("chunks/ab/abc")
    backend.delete("chunks/ab/abc")  # twice is fine
    with pytest.raises(NotFound):
        backend.get("chunks/ab/abc")


def test_objects_are_written_once(backend: Backend) -> None:
    assert backend.put("backups/b1", b"first") is True
    assert backend.put("backups/b1", b"second") is False  # refused, nothing changed
    assert backend.get("backups/b1") == b"first"
    assert backend.put("backups/b1", b"third", overwrite=True) is True
    assert backend.get("backups/b1") == b"third"


def test_empty_and_large_objects(backend: Backend) -> None:
    big = bytes(range(256)) * (5 * 4096 + 7)  # ~5 MiB, not a multiple of anything
    backend.put("chunks/00/big", big)
    backend.put("chunks/00/empty", b"")
    assert backend.get("chunks/00/big") == big
    assert backend.get("chunks/00/empty") == b""


def test_objects_of_every_size_around_block_boundaries_read_back_whole(backend: Backend) -> None:
    """The folder writes chunk-sized objects with O_DIRECT, padded to 4 KiB and cut back:
    nothing of the padding, nor of an earlier object's bytes, may show."""
    sizes = [65535, 65536, 65537, 20 * 4096, 20 * 4096 + 1, 8 << 20, (8 << 20) + 1, 300_001]
    for i, n in enumerate(sizes):
        data = bytes([i + 1]) * n
        backend.put(f"chunks/0{i}/x", data)
    for i, n in enumerate(sizes):
        got = backend.get(f"chunks/0{i}/x")
        assert len(got) == n and got == bytes([i + 1]) * n, n


def test_an_object_put_in_parts_reads_back_as_their_concatenation(backend: Backend) -> None:
    """Chunks are stored as (header, payload): whatever the sizes, the object is the
    parts end to end, written once like any other."""
    cases = [
        (b"\x01\x01\x00\x40\x00\x00", os.urandom(70_000)),  # a chunk-sized object
        (b"h", b"", os.urandom(5000), b"tail"),  # small: the buffered path
        (b"a" * 4095, b"b" * (4 << 20) + b"c"),  # across the 4 KiB alignment
    ]
    for i, parts in enumerate(cases):
        assert backend.put_parts(f"chunks/p{i}/x", parts) is True
        assert backend.get(f"chunks/p{i}/x") == b"".join(parts)
    assert backend.put_parts("chunks/p0/x", (b"other",)) is False
    assert backend.get("chunks/p0/x") == b"".join(cases[0])


def test_list_by_prefix(backend: Backend) -> None:
    for key in ("chunks/aa/1", "chunks/ab/2", "indexes/x", "config"):
        backend.put(key, key.encode())
    assert sorted(o.key for o in backend.list_objects("chunks/")) == ["chunks/aa/1", "chunks/ab/2"]
    assert sorted(o.key for o in backend.list_objects("")) == [
        "chunks/aa/1", "chunks/ab/2", "config", "indexes/x",
    ]  # fmt: skip
    assert list(backend.list_objects("nothing/")) == []
    sizes = {o.key: o.size for o in backend.list_objects("indexes/")}
    assert sizes == {"indexes/x": len(b"indexes/x")}


def test_touch_refreshes_mtime(backend: Backend) -> None:
    backend.put("chunks/cc/t", b"x")
    first = backend.stat("chunks/cc/t")
    assert first is not None
    time.sleep(1.1)
    backend.touch("chunks/cc/t")
    later = backend.stat("chunks/cc/t")
    assert later is not None and later.mtime > first.mtime
    assert backend.get("chunks/cc/t") == b"x"
    with pytest.raises(NotFound):
        backend.touch("chunks/cc/missing")


@pytest.mark.parametrize("bad", ["../x", "a//b", "/abs", "a/../b", "", "x y", "a\x00b"])
def test_bad_keys_refused(backend: Backend, bad: str) -> None:
    with pytest.raises(InvalidInput):
        backend.put(bad, b"x")


def test_racing_writers_one_wins_whole(backend: Backend) -> None:
    results: list[bool] = []
    payloads = [bytes([i]) * 100_000 for i in range(8)]

    def write(data: bytes) -> None:
        results.append(backend.put("backups/race", data))

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert backend.get("backups/race") in payloads  # one writer's whole object


def test_a_folder_without_o_direct_is_written_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses O_DIRECT (EINVAL at open; a unit test of the logic,
    since this machine's tmpfs takes it): the folder falls back and loses nothing."""
    import errno

    from snapback.repository.backends import local

    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(local.os, "open", no_direct)
    b = local.LocalBackend(tmp_path / "repo")
    data = os.urandom(1 << 20)
    assert b.put("chunks/aa/one", data) and b.get("chunks/aa/one") == data
    assert b._direct is False  # it noticed, once
    assert b.put("chunks/aa/two", data[:70000]) and b.get("chunks/aa/two") == data[:70000]
    assert not list((tmp_path / "repo").rglob(".tmp-*"))
