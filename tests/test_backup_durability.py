"""What a repository keeps through kills, pruning and damage: a backup killed while it
writes leaves every earlier backup whole and the repository checkable; an incremental
restores after its parents are pruned; zero chunks cost nothing; a chunk gone missing
is named by ``verify --read-data``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from snapback.config import load_settings
from snapback.drivers.imagefmt import qemu_img
from snapback.repository import repo as repo_mod
from snapback.repository.repo import holder
from snapback.services.catalog_queries import live_volume
from snapback.services.context import Context
from tests.conftest import Cli, assert_consistent, make_raw, write_bytes

MIB = 1 << 20

# Runs the CLI in a child process that kills itself (SIGKILL) just before the
# repository's folder backend is asked to write (``put_parts``) or delete
# (``delete``) the Nth object under a prefix: chunks half written, no index, no
# record; half a gc or prune. A backup's bitmap is started while its first chunks
# are read: the kill waits for it (a kill while qemu-img writes it is its own
# test), except with method ``bitmap``, which kills while ``qemu-img bitmap --add``
# runs. The rest is the real CLI against the real repository.
KILLER = """
import os, signal, sys, threading
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.storage.local import tracking
from snapback.repository.backends import local
method, prefix, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
started, real_start = threading.Event(), tracking.start
def start(head, name):
    real_start(head, name)
    started.set()
tracking.start = start
if method == "bitmap":  # killed once qemu-img has the head open for writing
    import struct, time
    from snapback.drivers.imagefmt import qcow2_bitmaps
    real_bitmap = qemu_img.bitmap
    def watch(path, before):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                now = qcow2_bitmaps.read_bitmaps(path)
            except (qcow2_bitmaps.Unreadable, struct.error, UnicodeDecodeError, OSError):
                break  # caught half-written: qemu-img is writing it
            if set(now) != before or any("in-use" in b.flags for b in now.values()):
                break
            time.sleep(0.0002)
        os.kill(os.getpid(), signal.SIGKILL)
    def bitmap(path, name, add):
        if add:
            before = set(qcow2_bitmaps.read_bitmaps(path))
            threading.Thread(target=watch, args=(path, before), daemon=True).start()
        return real_bitmap(path, name, add=add)
    qemu_img.bitmap = bitmap
else:
    real, seen = getattr(local.LocalBackend, method), [0]
    def hooked(self, key, *args, **kwargs):
        if key.startswith(prefix):
            seen[0] += 1
            if seen[0] == nth:
                started.wait(30)
                os.kill(os.getpid(), signal.SIGKILL)
        return real(self, key, *args, **kwargs)
    setattr(local.LocalBackend, method, hooked)
from snapback.cli.main import main
sys.argv = ["snapback", *sys.argv[4:]]
main()
"""


def killed_at(cli: Cli, method: str, prefix: str, nth: int, *args: str) -> None:
    """Run ``snapback ARGS`` until the Nth ``method`` under ``prefix``, killed there."""
    env = {**os.environ, "SNAPBACK_HOME": str(cli.home)}
    argv = [sys.executable, "-c", KILLER, method, prefix, str(nth), *args]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == -9, res.stderr


@pytest.fixture
def repo(cli: Cli, tmp_path: Path) -> str:
    path = str(tmp_path / "repo")
    cli("repo", "init", path)
    return path


def backup(cli: Cli, name: str, repo: str, *extra: str) -> dict[str, Any]:
    return json.loads(
        cli("backup", "create", name, "--repo", repo, "--format", "json", *extra).stdout
    )


def exported(cli: Cli, name: str, tmp: Path) -> bytes:
    out = tmp / f"{name}.raw"
    out.unlink(missing_ok=True)
    cli("volume", "export", name, "--file", str(out))
    return out.read_bytes()


def restored(cli: Cli, backup_id: str, repo: str, tmp: Path, name: str) -> bytes:
    cli("backup", "restore", backup_id, "--repo", repo, "--to-volume", name)
    return exported(cli, name, tmp)


def write(cli: Cli, name: str, offset: int, data: bytes) -> None:
    ctx = Context(load_settings(cli.home))
    with ctx.sessions() as s:
        storage = live_volume(s, "default", name).storage_name
    write_bytes(ctx, "default", storage, offset, data)


@pytest.mark.parametrize(
    ("prefix", "nth"),
    [("chunks/", 3), ("indexes/", 1), ("backups/", 1)],
    ids=["chunks", "index", "record"],
)
def test_backup_killed_while_it_writes_the_repository(
    cli: Cli, repo: str, tmp_path: Path, prefix: str, nth: int
) -> None:
    src = make_raw(
        tmp_path / "d.raw", 64 * MIB, {i * MIB: os.urandom(MIB) for i in range(0, 64, 2)}
    )
    cli("volume", "import", "v", "--file", str(src))
    first = backup(cli, "v", repo)
    write(cli, "v", 0, os.urandom(40 * MIB))  # ten chunks change
    before_kill = exported(cli, "v", tmp_path)
    killed_at(cli, "put_parts", prefix, nth, "backup", "create", "v", "--repo", repo)
    # the repository is checkable: the killed backup left at most unreferenced objects
    check = cli.json("repo", "check", repo, "--read-data")
    assert check["problems"] == [] and check["backups"] == 1, check
    assert [b["id"] for b in cli.json("backup", "list", "--repo", repo)] == [first["id"]]
    assert restored(cli, first["id"], repo, tmp_path, "r-first") == src.read_bytes()
    cli("gc")  # the killed operation is rolled back: its bitmap goes, the parent's stays
    nxt = backup(cli, "v", repo)
    assert nxt["parent"] == first["id"] and nxt["change_tracking"] == "dirty-bitmap", nxt["note"]
    assert restored(cli, nxt["id"], repo, tmp_path, "r-next") == before_kill
    assert cli.json("repo", "check", repo, "--read-data")["problems"] == []
    assert_consistent(Context(load_settings(cli.home)))


def test_backup_killed_while_qemu_img_starts_its_bitmap(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    """The kill lands once ``qemu-img bitmap --add`` has the volume's head open for
    writing (it runs while the first chunks are read). QEMU then leaves the header
    saying its bitmaps are not to be trusted, so the parent's is lost too: the
    volume's bytes and the repository are intact, the next backup still follows
    the chain, comparing hashes and saying so (or by the bitmap, when the kill came
    too late to harm it), and the one after tracks changes again."""
    data = {i * MIB: os.urandom(MIB) for i in range(0, 64, 2)}
    src = make_raw(tmp_path / "d.raw", 64 * MIB, data)
    cli("volume", "import", "v", "--file", str(src))
    first = backup(cli, "v", repo)
    write(cli, "v", 0, os.urandom(40 * MIB))
    before_kill = exported(cli, "v", tmp_path)
    killed_at(cli, "bitmap", "", 0, "backup", "create", "v", "--repo", repo)
    assert exported(cli, "v", tmp_path) == before_kill
    ctx = Context(load_settings(cli.home))
    with ctx.sessions() as s:
        storage = live_volume(s, "default", "v").storage_name
    pool = ctx.pool("default")
    head = str(pool.layer_path(storage, pool.load(storage).head))
    checked = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", head],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode in (0, 3), checked.stderr  # 3: leaked clusters, harmless
    assert json.loads(checked.stdout).get("corruptions", 0) == 0
    assert cli.json("repo", "check", repo, "--read-data")["problems"] == []
    cli("gc")
    nxt = backup(cli, "v", repo)
    assert nxt["parent"] == first["id"], nxt
    if nxt["change_tracking"] != "dirty-bitmap":
        assert nxt["change_tracking"] == "hash-compare" and "tracking lost" in nxt["note"]
    assert restored(cli, nxt["id"], repo, tmp_path, "r-next") == before_kill
    write(cli, "v", 48 * MIB, os.urandom(MIB))
    last = backup(cli, "v", repo)
    assert last["change_tracking"] == "dirty-bitmap" and last["stats"]["read_bytes"] == 4 * MIB
    assert restored(cli, last["id"], repo, tmp_path, "r-last") == exported(cli, "v", tmp_path)
    assert set(qemu_img.bitmaps(head)) == {f"snapback-{nxt['id']}", f"snapback-{last['id']}"}
    assert_consistent(Context(load_settings(cli.home)))


def test_an_incremental_restores_after_its_parents_are_pruned(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    src = make_raw(
        tmp_path / "d.raw", 48 * MIB, {0: os.urandom(8 * MIB), 24 * MIB: os.urandom(MIB)}
    )
    cli("volume", "import", "v", "--file", str(src))
    made = [backup(cli, "v", repo)]
    for n in range(3):  # a chain: full, then three incrementals, each changing one chunk
        write(cli, "v", (4 + 4 * n) * MIB + 4096, os.urandom(MIB))
        made.append(backup(cli, "v", repo))
        assert made[-1]["mode"] == "incremental" and made[-1]["parent"] == made[-2]["id"]
    want = exported(cli, "v", tmp_path)
    done = cli.json("repo", "prune", repo, "--keep-last", "1")
    assert sorted(done["remove"]) == sorted(b["id"] for b in made[:3])
    assert done["gc"]["removed"]  # the chunks only the pruned backups had are gone
    assert [b["id"] for b in cli.json("backup", "list", "--repo", repo)] == [made[-1]["id"]]
    assert cli.json("repo", "check", repo, "--read-data")["problems"] == []
    assert restored(cli, made[-1]["id"], repo, tmp_path, "r") == want
    write(cli, "v", 40 * MIB, os.urandom(MIB))  # the chain goes on from the survivor
    after = backup(cli, "v", repo)
    assert after["parent"] == made[-1]["id"] and after["change_tracking"] == "dirty-bitmap"
    assert restored(cli, after["id"], repo, tmp_path, "r-after") == exported(cli, "v", tmp_path)


def test_zero_chunks_written_as_data_are_not_stored(cli: Cli, repo: str, tmp_path: Path) -> None:
    """Zeros a guest wrote (allocated, not holes) cost no chunk, and restore as zeros."""
    cli("volume", "create", "z", "--size", str(32 * MIB))
    write(cli, "z", 0, os.urandom(MIB))
    write(cli, "z", 8 * MIB, bytes(12 * MIB))  # three whole chunks of written zeros
    b = backup(cli, "z", repo)
    assert b["stats"]["read_bytes"] >= 16 * MIB  # the written zeros were read
    assert b["stats"]["new_chunks"] == 1  # and stored nothing
    index = cli.json("backup", "show", b["id"], "--repo", repo)
    assert index["disks"][0]["size"] == 32 * MIB
    assert restored(cli, b["id"], repo, tmp_path, "r") == exported(cli, "z", tmp_path)
    assert cli.json("volume", "show", "r")["allocated"] < 4 * MIB  # zeros stayed holes


def test_verify_names_a_chunk_gone_missing(cli: Cli, repo: str, tmp_path: Path) -> None:
    src = make_raw(tmp_path / "d.raw", 16 * MIB, {0: os.urandom(MIB), 8 * MIB: os.urandom(MIB)})
    cli("volume", "import", "v", "--file", str(src))
    b = backup(cli, "v", repo)
    victim = next(p for p in (Path(repo) / "chunks").rglob("*") if p.is_file())
    victim.unlink()
    for extra in ((), ("--read-data",)):
        res = cli(
            "backup", "verify", b["id"], "--repo", repo, "--format", "json", *extra, check=False
        )
        assert res.returncode == 8 and res.json()["missing"] == [victim.name], res.stdout
    for extra in ((), ("--read-data",)):
        check = cli("repo", "check", repo, "--format", "json", *extra, check=False)
        assert check.returncode == 8 and victim.name in json.dumps(check.json()["problems"])
    bad = cli("backup", "restore", b["id"], "--repo", repo, "--to-volume", "r", check=False)
    assert bad.returncode != 0 and victim.name in bad.stderr
    assert [v["name"] for v in cli.json("volume", "list")] == ["v"]  # no half-restored volume


def ids(cli: Cli, repo: str) -> list[str]:
    return [b["id"] for b in cli.json("backup", "list", "--repo", repo)]


@pytest.mark.parametrize("op", ["sync", "import", "gc", "prune"])
def test_repository_upkeep_killed_half_way(cli: Cli, repo: str, tmp_path: Path, op: str) -> None:
    """Killed half-way, each leaves both repositories checkable and every backup they
    had whole; run again, it finishes; its dead lock holds nobody up."""
    src = make_raw(
        tmp_path / "d.raw", 32 * MIB, {i * MIB: os.urandom(MIB) for i in range(0, 32, 2)}
    )
    cli("volume", "import", "v", "--file", str(src))
    made, want = [], []
    for n in range(3):
        if n:
            write(cli, "v", (n - 1) * 8 * MIB, os.urandom(8 * MIB))
        made.append(backup(cli, "v", repo)["id"])
        want.append(exported(cli, "v", tmp_path))
    other = str(tmp_path / "other")
    cli("repo", "init", other, "--copy-keys-from", repo)
    if op == "sync":
        killed_at(cli, "put_parts", "chunks/", 3, "repo", "sync", repo, other)
        again: tuple[str, ...] = ("repo", "sync", repo, other)
        target, kept = other, []
    elif op == "import":
        archive = str(tmp_path / "last.tar")
        cli("repo", "export", repo, made[2], "--file", archive)
        killed_at(cli, "put_parts", "chunks/", 3, "repo", "import", other, "--file", archive)
        again, target, kept = ("repo", "import", other, "--file", archive), other, []
    elif op == "gc":
        cli("backup", "delete", made[0], "--repo", repo)
        killed_at(cli, "delete", "chunks/", 2, "repo", "gc", repo)
        again, target, kept = ("repo", "gc", repo), repo, made[1:]
    else:
        killed_at(cli, "delete", "", 2, "repo", "prune", repo, "--keep-last", "1")
        again, target = ("repo", "prune", repo, "--keep-last", "1"), repo
        kept = ids(cli, repo)  # one of the two records it removes went first
        assert len(kept) == 2 and kept[1] == made[2] and kept[0] in made[:2], kept
    check = cli.json("repo", "check", target, "--read-data")
    assert check["problems"] == [] and ids(cli, target) == kept, check
    for backup_id in kept:
        i = made.index(backup_id)
        assert restored(cli, backup_id, target, tmp_path, f"k{i}") == want[i]
    started = time.monotonic()
    done = cli.json(*again)  # the dead process's lock is no one's: nothing waits
    assert time.monotonic() - started < 60, done
    if op in ("gc", "prune"):
        freed = done if op == "gc" else done["gc"]
        assert freed["removed"] and not freed["skipped"], freed
    final = {"sync": made, "import": made[2:], "gc": made[1:], "prune": made[2:]}[op]
    assert ids(cli, target) == final
    check = cli.json("repo", "check", target, "--read-data")
    assert check["problems"] == [] and check["unreferenced"] == 0, check
    assert restored(cli, made[2], target, tmp_path, "last") == want[2]
    assert cli.json("repo", "check", repo, "--read-data")["problems"] == []
    write(cli, "v", 0, os.urandom(MIB))  # and backups go on at once
    started = time.monotonic()
    nxt = backup(cli, "v", repo)
    assert time.monotonic() - started < 60 and nxt["change_tracking"] == "dirty-bitmap"


def test_repo_unlock_removes_dead_locks_and_with_all_live_ones(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    """A gc killed on another machine leaves a lock this machine cannot judge dead
    until its heartbeat is 15 minutes old: backups wait for it. ``repo unlock``
    removes only dead holders' locks; ``--all`` removes that one too."""
    cli(
        "volume",
        "import",
        "v",
        "--file",
        str(make_raw(tmp_path / "d.raw", 8 * MIB, {0: b"d" * MIB})),
    )
    locks = Path(repo) / "locks"
    locks.mkdir(exist_ok=True)
    now = time.time()
    child = subprocess.Popen(["sleep", "30"])
    dead = {"kind": "backup", "id": "dead", "at": now, **holder(), "pid": child.pid}
    dead["pid_started"] = repo_mod._started(child.pid)
    child.kill()
    child.wait()
    remote = {"kind": "gc", "id": "remote", "at": now, **holder(), "boot": "another-machine"}
    (locks / "backup-dead").write_text(json.dumps(dead))
    (locks / "gc-remote").write_text(json.dumps(remote))
    assert cli.json("repo", "unlock", repo)["removed"] == ["locks/backup-dead"]
    assert sorted(p.name for p in locks.iterdir()) == ["gc-remote"]  # live as far as we know
    assert cli.json("repo", "unlock", repo, "--all")["removed"] == ["locks/gc-remote"]
    assert list(locks.iterdir()) == []
    started = time.monotonic()
    b = backup(cli, "v", repo)  # nothing to wait for any more
    assert time.monotonic() - started < 60 and b["mode"] == "full"
    bad = cli("repo", "unlock", str(tmp_path / "nowhere"), check=False)
    assert bad.returncode == 3 and "holds no snapback repository" in bad.stderr
