"""Damaged and hostile repository objects: one clear DamagedObject, never another
error, never other content (cases first found by scripts/fuzz.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from snapback.repository import repo as repo_mod
from snapback.repository.backends.local import LocalBackend
from snapback.repository.repo import LOCK_STALE_S, Repository, chunk_key, holder, lock_stale
from snapback.repository.sealing import RECORD, DamagedObject

RECORD_DOC = {"id": "20261129T000000.000000Z-0badc0de", "parent": None, "disks": [], "n": 1}


def repo_at(tmp_path: Path, passphrase: str | None) -> Repository:
    return Repository.init(LocalBackend(tmp_path / "repo"), passphrase)


@pytest.mark.parametrize("passphrase", [None, "correct horse battery"])
def test_truncated_objects_are_damaged_whatever_their_length(
    tmp_path: Path, passphrase: str | None
) -> None:
    repo = repo_at(tmp_path, passphrase)
    cid, _ = repo.put_chunk(b"chunk data " * 1000)
    index_id = repo.put_index({"disk": "vda", "size": 4096, "chunk_size": 4096, "chunks": [cid]})
    repo.put_record(RECORD_DOC)
    objects = {
        tmp_path / "repo" / chunk_key(cid): lambda: repo.get_chunk(cid),
        tmp_path / "repo" / "indexes" / index_id: lambda: repo.get_index(index_id),
        tmp_path / "repo" / "backups" / RECORD_DOC["id"]: lambda: repo.get_record(RECORD_DOC["id"]),
    }
    for path, read in objects.items():
        whole = path.read_bytes()
        # header (6) + nonce (12) + tag (16) and around, and one byte short
        for length in sorted({*range(min(40, len(whole))), len(whole) - 1}):
            path.write_bytes(whole[:length])
            with pytest.raises(DamagedObject):
                read()
        path.write_bytes(whole)
        read()  # whole again: reads back


def test_a_record_that_is_not_a_json_object_is_damaged(tmp_path: Path) -> None:
    repo = repo_at(tmp_path, None)
    repo.put_record(RECORD_DOC)
    path = tmp_path / "repo" / "backups" / RECORD_DOC["id"]
    key = f"backups/{RECORD_DOC['id']}"
    for plain in (b"[1, 2, 3]", b'"text"', b"null", b"[" * 100_000 + b"]" * 100_000):
        path.write_bytes(repo.sealer.seal(RECORD, key, plain))
        with pytest.raises(DamagedObject, match="not readable"):
            repo.get_record(RECORD_DOC["id"])


def test_every_bit_flip_in_a_plain_record_is_caught_or_harmless(tmp_path: Path) -> None:
    """Records are named by backup id, not by content: in an unencrypted repository
    only zstd's checksum (written since this change) tells a damaged one."""
    repo = repo_at(tmp_path, None)
    repo.put_record(RECORD_DOC)
    path = tmp_path / "repo" / "backups" / RECORD_DOC["id"]
    whole = path.read_bytes()
    caught = 0
    for pos in range(len(whole)):
        for bit in range(8):
            damaged = bytearray(whole)
            damaged[pos] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            try:
                got = repo.get_record(RECORD_DOC["id"])
            except DamagedObject:
                caught += 1
                continue
            assert got == RECORD_DOC, (pos, bit, json.dumps(got))
    path.write_bytes(whole)
    assert repo.get_record(RECORD_DOC["id"]) == RECORD_DOC
    assert caught > 7 * len(whole)  # nearly every flip is caught, none slips through


def test_a_lock_whose_holder_died_here_is_stale_at_once_others_by_heartbeat() -> None:
    now = time.time()
    mine = {"at": now, **holder()}
    assert not lock_stale(mine, now)  # this process runs
    child = subprocess.Popen(["sleep", "30"])
    theirs = {**mine, "pid": child.pid, "pid_started": repo_mod._started(child.pid)}
    assert not lock_stale(theirs, now)
    child.kill()
    child.wait()
    assert lock_stale(theirs, now)  # killed on this machine: nobody waits 15 minutes
    assert lock_stale({**mine, "pid_started": 1}, now)  # the pid now names another process
    # another machine, container or boot: only the heartbeat can tell
    assert not lock_stale({**theirs, "boot": "another-machine"}, now)
    assert not lock_stale({**theirs, "pidns": 1}, now)
    assert not lock_stale({"at": now}, now)  # a lock of a snapback before holders
    assert lock_stale({**theirs, "boot": "another-machine", "at": now - LOCK_STALE_S}, now)
