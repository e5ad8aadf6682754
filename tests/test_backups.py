"""Backups into a real repository folder, restored byte for byte; damage found; kills survived."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zstandard

from snapback.repository.backends.local import LocalBackend
from snapback.repository.repo import Repository, chunk_key
from snapback.repository.sealing import CHUNK, HEADER
from tests.conftest import SNAPBACK, Cli, assert_consistent, make_raw

MIB = 1 << 20
PASS = {"SNAPBACK_REPO_PASSPHRASE": "correct horse battery"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def repo(cli: Cli, tmp_path: Path) -> str:
    path = str(tmp_path / "repo")
    cli("repo", "init", path)
    return path


def disk(tmp_path: Path, name: str = "d.raw") -> Path:
    """48 MiB with data in a few places (one chunk repeated: deduplicated)."""
    return make_raw(
        tmp_path / name,
        48 * MIB,
        {0: os.urandom(MIB), 9 * MIB: b"x" * (3 * MIB), 21 * MIB: b"x" * (3 * MIB)},
    )


def backup(
    cli: Cli, volume: str, repo: str, *extra: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    res = cli("backup", "create", volume, "--repo", repo, "--format", "json", *extra, env=env)
    return json.loads(res.stdout)


def restore_bytes(cli: Cli, backup_id: str, repo: str, tmp: Path, name: str) -> bytes:
    cli("backup", "restore", backup_id, "--repo", repo, "--to-volume", name)
    out = tmp / f"{name}.raw"
    cli("volume", "export", name, "--file", str(out))
    return out.read_bytes()


def test_full_and_incremental_restore_byte_identical(cli: Cli, repo: str, tmp_path: Path) -> None:
    src = disk(tmp_path)
    original = src.read_bytes()
    cli("volume", "import", "v", "--file", str(src))
    full = backup(cli, "v", repo)
    assert full["mode"] == "full"
    assert full["stats"]["read_bytes"] == 12 * MIB  # only the 3 allocated chunks were read
    assert full["stats"]["new_chunks"] == 2  # chunks 2 and 5 hold the same bytes: stored once
    with open(src, "r+b") as f:  # change one chunk
        f.seek(30 * MIB)
        f.write(b"changed" * 1000)
    cli("volume", "delete", "v")
    cli("volume", "import", "v", "--file", str(src))
    # a new volume id: auto finds no parent of this volume, --incremental must fail
    bad = cli("backup", "create", "v", "--repo", repo, "--incremental", check=False)
    assert bad.returncode == 3 and "no earlier backup" in bad.stderr
    second = backup(cli, "v", repo)
    third = backup(cli, "v", repo)
    assert third["mode"] == "incremental" and third["parent"] == second["id"]
    assert third["stats"]["new_chunks"] == 0 and third["stats"]["reused_chunks"] > 0
    assert restore_bytes(cli, full["id"], repo, tmp_path, "r-full") == original
    got = restore_bytes(cli, third["id"], repo, tmp_path, "r-third")
    assert got == src.read_bytes()
    # restore needs no parent: drop the parent's record, restore the child again
    (Path(repo) / "backups" / second["id"]).unlink()
    assert restore_bytes(cli, third["id"], repo, tmp_path, "r-again") == src.read_bytes()
    restored = cli.json("volume", "show", "r-again")
    assert restored["allocated"] < 10 * MIB  # 7 MiB of data; zero chunks and runs stayed holes
    ctx_home = cli.home
    from snapback.config import load_settings
    from snapback.services.context import Context

    assert_consistent(Context(load_settings(ctx_home)))


def test_repository_of_an_older_snapback_keeps_its_content_hash(cli: Cli, tmp_path: Path) -> None:
    """New repositories name content by BLAKE3; one whose config says sha256 or
    blake2b-256 (made before) keeps those names, and a hash nobody knows is refused."""
    from blake3 import blake3

    src = disk(tmp_path)
    cli("volume", "import", "v", "--file", str(src))
    new, sha, old = tmp_path / "new", tmp_path / "sha", tmp_path / "old"
    for path in (new, sha, old):
        cli("repo", "init", str(path))
    assert json.loads((new / "config").read_bytes())["hash"] == "blake3"
    config = json.loads((old / "config").read_bytes())
    (sha / "config").write_text(json.dumps({**config, "hash": "sha256"}))
    (old / "config").write_text(json.dumps({**config, "hash": "blake2b-256"}))
    data = src.read_bytes()
    chunk = data[8 * MIB : 12 * MIB]
    for path, name in (
        (new, blake3(chunk).hexdigest()),
        (sha, hashlib.sha256(chunk).hexdigest()),
        (old, hashlib.blake2b(chunk, digest_size=32).hexdigest()),
    ):
        b = backup(cli, "v", str(path))
        assert (path / "chunks" / name[:2] / name).is_file()
        assert restore_bytes(cli, b["id"], str(path), tmp_path, f"r-{path.name}") == data
        assert cli.json("backup", "verify", b["id"], "--repo", str(path), "--read-data")["ok"]
    (old / "config").write_text(json.dumps({**config, "hash": "md5"}))
    bad = cli("backup", "list", "--repo", str(old), check=False)
    assert bad.returncode != 0 and "content hash 'md5'" in bad.stderr


def test_verify_finds_damage_and_a_later_backup_repairs_it(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    cli("volume", "import", "v", "--file", str(disk(tmp_path)))
    b = backup(cli, "v", repo, "--full")
    ok = cli.json("backup", "verify", b["id"], "--repo", repo, "--read-data")
    assert ok["ok"] and ok["chunks"] == 2
    chunks = sorted(p for p in (Path(repo) / "chunks").rglob("*") if p.is_file())
    flipped, cut = chunks
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:100])
    quick = cli("backup", "verify", b["id"], "--repo", repo, "--format", "json", check=False)
    assert quick.returncode == 0  # without --read-data only presence is checked
    deep = cli("backup", "verify", b["id"], "--repo", repo, "--read-data", check=False)
    assert deep.returncode == 8
    assert f"damaged {flipped.name}" in deep.stdout and f"damaged {cut.name}" in deep.stdout
    # both were quarantined: the backup now misses them, a later one never reuses them
    gone = cli("backup", "verify", b["id"], "--repo", repo, "--format", "json", check=False)
    assert gone.returncode == 8 and sorted(gone.json()["missing"]) == sorted(
        [cut.name, flipped.name]
    )
    assert (Path(repo) / "quarantine" / flipped.name).is_file()
    res = cli("backup", "restore", b["id"], "--repo", repo, "--to-volume", "r", check=False)
    assert res.returncode == 3 and [v["name"] for v in cli.json("volume", "list")] == ["v"]
    again = backup(cli, "v", repo)
    assert again["stats"]["new_chunks"] == 2  # stored again from the source
    for backup_id in (b["id"], again["id"]):  # which also repaired the first backup
        assert cli.json("backup", "verify", backup_id, "--repo", repo, "--read-data")["ok"]


def test_encryption_passphrase_tampering_and_bombs(cli: Cli, tmp_path: Path) -> None:
    repo = str(tmp_path / "secret")
    cli("repo", "init", repo, "--encrypt", env=PASS)
    cli("volume", "import", "v", "--file", str(disk(tmp_path)))
    b = backup(cli, "v", repo, env=PASS)
    chunk_names = [p.name for p in (Path(repo) / "chunks").rglob("*") if p.is_file()]
    from blake3 import blake3

    unkeyed = blake3(b"\0" * MIB + b"x" * (3 * MIB)).hexdigest()
    assert len(chunk_names) == 2 and unkeyed not in chunk_names  # keyed ids reveal nothing
    stored = b"".join(p.read_bytes() for p in (Path(repo) / "chunks").rglob("*") if p.is_file())
    assert b"x" * 64 not in stored
    wrong = cli("backup", "list", "--repo", repo, check=False,
                env={"SNAPBACK_REPO_PASSPHRASE": "not the one at all"})  # fmt: skip
    assert wrong.returncode == 5 and "wrong passphrase" in wrong.stderr
    none = cli("backup", "list", "--repo", repo, check=False, env={"SNAPBACK_REPO_PASSPHRASE": ""})
    assert none.returncode == 5

    record = Path(repo) / "backups" / b["id"]
    good = record.read_bytes()
    tampered = bytearray(good)
    tampered[-20] ^= 0xFF
    record.write_bytes(bytes(tampered))
    res = cli("backup", "show", b["id"], "--repo", repo, check=False, env=PASS)
    assert res.returncode == 6 and "fails authentication" in res.stderr
    record.write_bytes(good)

    # a decompression bomb in an unencrypted repository: declares 4 MiB, inflates to 512 MiB
    plain_repo = tmp_path / "plain"
    r = Repository.init(LocalBackend(plain_repo))
    bomb_plain = b"\0" * (512 * MIB)
    cid = "ab" * 32
    key = chunk_key(cid)
    payload = zstandard.ZstdCompressor(level=19).compress(bomb_plain)
    LocalBackend(plain_repo).put(key, HEADER.pack(CHUNK, 1, 4 * MIB) + payload)
    from snapback.repository.sealing import DamagedObject

    with pytest.raises(DamagedObject, match="decompresses past"):
        r.get_chunk(cid)
    # a restore decompresses into its worker's 4 MiB buffer: the bomb stops there too
    buf = memoryview(bytearray(4 * MIB))
    with pytest.raises(DamagedObject, match="decompresses past its declared 4194304 bytes"):
        r.get_chunk_into(cid, buf)
    short = zstandard.ZstdCompressor().compress(b"s" * MIB)  # says 4 MiB, holds 1 MiB
    LocalBackend(plain_repo).put(key, HEADER.pack(CHUNK, 1, 4 * MIB) + short, overwrite=True)
    with pytest.raises(DamagedObject, match="does not hold the 4194304 bytes"):
        r.get_chunk_into(cid, buf)
    good_id, _ = r.put_chunk(b"g" * (4 * MIB))
    assert r.get_chunk_into(good_id, buf) == b"g" * (4 * MIB)


@pytest.mark.parametrize("step", ["snapping", "recorded", "rotated"])
def test_backup_killed_at_each_step(cli: Cli, repo: str, tmp_path: Path, step: str) -> None:
    src = disk(tmp_path)
    cli("volume", "import", "v", "--file", str(src))
    first = backup(cli, "v", repo)
    res = cli("backup", "create", "v", "--repo", repo, check=False,
              env={"SNAPBACK_CRASH_AT": f"backup.create:{step}"})  # fmt: skip
    assert res.returncode == -9
    cli("gc")
    ids = [b["id"] for b in cli.json("backup", "list", "--repo", repo)]
    assert ids[0] == first["id"] and len(ids) == (1 if step == "snapping" else 2)
    assert cli.json("snapshot", "list", "v") == []  # the temporary snapshot went
    for n, backup_id in enumerate(ids):
        assert restore_bytes(cli, backup_id, repo, tmp_path, f"r{n}") == src.read_bytes()
    assert cli.json("gc", "--dry-run")["debris"] == []  # the kept bitmap is explained
    nxt = backup(cli, "v", repo)  # tracking goes on from the newest backup, killed or not
    assert nxt["parent"] == ids[-1] and nxt["change_tracking"] == "dirty-bitmap", nxt["note"]
    from snapback.config import load_settings
    from snapback.services import backup_catalog
    from snapback.services.context import Context

    ctx = Context(load_settings(cli.home))
    catalogued = [e["id"] for e in backup_catalog.entries(ctx, repo)]
    assert catalogued == [*ids, nxt["id"]]  # the killed backup's entry came from the journal
    assert_consistent(ctx)


@pytest.mark.parametrize("step", ["volume", "opened", "written"])
def test_restore_killed_at_each_step(cli: Cli, repo: str, tmp_path: Path, step: str) -> None:
    """Before its data is whole the new volume goes; once written it stays, whole."""
    src = disk(tmp_path)
    cli("volume", "import", "v", "--file", str(src))
    first = backup(cli, "v", repo)
    res = cli("backup", "restore", first["id"], "--repo", repo, "--to-volume", "r",
              check=False, env={"SNAPBACK_CRASH_AT": f"backup.restore:{step}"})  # fmt: skip
    assert res.returncode == -9, res.stderr
    cli("gc")
    names = {v["name"] for v in cli.json("volume", "list")}
    if step == "written":
        out = tmp_path / "r.raw"
        cli("volume", "export", "r", "--file", str(out))
        assert out.read_bytes() == src.read_bytes()
    else:
        assert "r" not in names
        assert restore_bytes(cli, first["id"], repo, tmp_path, "r") == src.read_bytes()
    from snapback.config import load_settings
    from snapback.services.context import Context

    assert_consistent(Context(load_settings(cli.home)))


def test_gc_removes_only_the_unreferenced_and_never_races_a_backup(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    big = make_raw(tmp_path / "big.raw", 96 * MIB, {i * MIB: os.urandom(MIB) for i in range(96)})
    cli("volume", "import", "big", "--file", str(big))
    cli("volume", "import", "v", "--file", str(disk(tmp_path)))
    keep = backup(cli, "v", repo)
    doomed = backup(cli, "big", repo)
    cli("backup", "delete", doomed["id"], "--repo", repo)
    dry = cli.json("repo", "gc", repo, "--dry-run")
    assert dry["unreferenced_chunks"] == 24 and not dry["removed"]
    # a backup of the same data runs while gc runs again and again
    env = {
        **os.environ,
        "SNAPBACK_HOME": str(cli.home),
        "SNAPBACK_PAUSE_AT": "backup.create:snapping:2",
    }
    runner = subprocess.Popen(
        [SNAPBACK, "backup", "create", "big", "--repo", repo, "--format", "json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    outcomes = set()
    while runner.poll() is None:
        outcomes.add(cli.json("repo", "gc", repo)["skipped"] or "removed")
    out, err = runner.communicate()
    assert runner.returncode == 0, err
    raced = json.loads(out)
    assert cli.json("repo", "gc", repo)["removed"]
    for b in (keep, raced):  # nothing a finished or running backup referenced went
        assert cli.json("backup", "verify", b["id"], "--repo", repo, "--read-data")["ok"]
    assert restore_bytes(cli, raced["id"], repo, tmp_path, "r-big") == big.read_bytes()
    check = cli.json("repo", "check", repo, "--read-data")
    assert check["problems"] == [] and check["unreferenced"] == 0 and check["backups"] == 2
    assert any("sweep skipped" in o for o in outcomes), outcomes  # gc ran during the backup


def test_repo_check_names_the_backups_a_damaged_chunk_breaks(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    cli("volume", "import", "v", "--file", str(disk(tmp_path)))
    first, second = backup(cli, "v", repo, "--full"), backup(cli, "v", repo, "--full")
    victim = next(p for p in (Path(repo) / "chunks").rglob("*") if p.is_file())
    victim.write_bytes(victim.read_bytes()[:-1] + b"!")
    res = cli("repo", "check", repo, "--read-data", check=False)
    assert res.returncode == 8
    line = next(x for x in res.stdout.splitlines() if victim.name in x)
    assert "damaged" in line and first["id"] in line and second["id"] in line


def test_sync_copies_only_what_the_offsite_lacks(cli: Cli, tmp_path: Path) -> None:
    src, dst, alien = (str(tmp_path / n) for n in ("src", "dst", "alien"))
    cli("repo", "init", src, "--encrypt", env=PASS)
    cli("repo", "init", dst, "--copy-keys-from", src, env=PASS)
    cli("repo", "init", alien, "--encrypt", env=PASS)
    data = disk(tmp_path)
    cli("volume", "import", "v", "--file", str(data))
    first = backup(cli, "v", src, env=PASS)
    done = cli("repo", "sync", src, dst, "--format", "json", env=PASS).json()
    assert done["copied"] == {"chunks": 2, "indexes": 1, "backups": 1}
    again = backup(cli, "v", src, env=PASS)  # nothing new: only an index and a record
    second = cli("repo", "sync", src, dst, "--format", "json", env=PASS).json()
    assert second["copied"] == {"backups": 1} and second["present"] == 4
    ids = [
        b["id"] for b in cli("backup", "list", "--repo", dst, "--format", "json", env=PASS).json()
    ]
    assert ids == [first["id"], again["id"]]
    cli("backup", "restore", again["id"], "--repo", dst, "--to-volume", "off", env=PASS)
    out = tmp_path / "off.raw"
    cli("volume", "export", "off", "--file", str(out))
    assert out.read_bytes() == data.read_bytes()
    res = cli("repo", "sync", src, alien, check=False, env=PASS)
    assert res.returncode == 6 and "names content differently" in res.stderr


def test_restore_at_a_time_picks_the_last_backup_before_it(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    import time

    src = disk(tmp_path)
    cli("volume", "import", "v", "--file", str(src))
    first = backup(cli, "v", repo)
    time.sleep(1.5)
    between = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 0.5))
    write_at = 40 * MIB
    from snapback.config import load_settings
    from snapback.services.catalog_queries import live_volume
    from snapback.services.context import Context
    from tests.conftest import write_bytes

    ctx = Context(load_settings(cli.home))
    with ctx.sessions() as s:
        storage = live_volume(s, "default", "v").storage_name
    write_bytes(ctx, "default", storage, write_at, b"later" * 100)
    backup(cli, "v", repo)
    res = cli("backup", "restore", "--repo", repo, "--to-volume", "old", "--at", between,
              "--of", "v", "--format", "json")  # fmt: skip
    assert res.json()["backup"] == first["id"]
    out = tmp_path / "old.raw"
    cli("volume", "export", "old", "--file", str(out))
    assert out.read_bytes() == src.read_bytes()
    early = cli("backup", "restore", "--repo", repo, "--to-volume", "x", "--at",
                "2000-01-01T00:00:00Z", "--of", "v", check=False)  # fmt: skip
    assert early.returncode == 3 and "no backup of v" in early.stderr


def test_rbd_volume_backup_restores_to_rbd_and_to_local(rbd_conf: str, tmp_path: Path) -> None:
    from tests.rbd_fixtures import wipe

    home = tmp_path / "home"
    home.mkdir()
    (home / "snapback.toml").write_text(
        f'[pools.default]\ndriver = "rbd"\nconf = "{rbd_conf}"\npool = "vols"\n'
        f'[pools.images]\ndriver = "rbd"\nconf = "{rbd_conf}"\npool = "others"\n'
        f'[pools.files]\ndriver = "local"\npath = "{tmp_path / "files"}"\n'
    )
    cli = Cli(home, {})
    repo = str(tmp_path / "repo")
    cli("repo", "init", repo)
    src = disk(tmp_path)
    try:
        cli("volume", "import", "v", "--file", str(src))
        first = backup(cli, "v", repo)
        assert first["source"]["driver"] == "rbd"
        assert first["stats"]["read_bytes"] == 12 * MIB  # rbd diff: allocated objects only
        second = backup(cli, "v", repo)
        assert second["mode"] == "incremental" and second["stats"]["new_chunks"] == 0
        assert second["change_tracking"] == "rbd-diff" and second["stats"]["read_bytes"] == 0
        for pool, name in (("default", "back-rbd"), ("files", "back-local")):
            cli("backup", "restore", second["id"], "--repo", repo, "--to-volume", name,
                "--pool", pool)  # fmt: skip
            out = tmp_path / f"{name}.raw"
            cli("volume", "export", name, "--pool", pool, "--file", str(out))
            assert out.read_bytes() == src.read_bytes(), pool
            shown = cli.json("volume", "show", name, "--pool", pool)
            assert shown["allocated"] < 16 * MIB, (pool, shown)  # zero runs stayed holes
        # one snapshot is kept as the next diff base: the last backup's
        snaps = [x["name"] for x in cli.json("snapshot", "list", "v")]
        assert snaps == [f"backup-{second['id']}"]
        from snapback.config import load_settings
        from snapback.services.catalog_queries import live_volume
        from snapback.services.context import Context
        from tests.conftest import write_bytes

        ctx = Context(load_settings(home))
        with ctx.sessions() as s:
            storage = live_volume(s, "default", "v").storage_name
        write_bytes(ctx, "default", storage, 30 * MIB, b"tracked" * 100)
        third = backup(cli, "v", repo)
        assert third["change_tracking"] == "rbd-diff"
        assert third["stats"]["read_bytes"] == 4 * MIB and third["stats"]["new_chunks"] == 1
        assert [x["name"] for x in cli.json("snapshot", "list", "v")] == [f"backup-{third['id']}"]
        cli("snapshot", "delete", f"v@backup-{third['id']}")  # tracking lost
        fourth = backup(cli, "v", repo)
        assert fourth["change_tracking"] == "hash-compare" and "tracking lost" in fourth["note"]
        assert fourth["stats"]["read_bytes"] == 16 * MIB  # every allocated chunk read again
        assert fourth["stats"]["new_chunks"] == 0
        expected = bytearray(src.read_bytes())
        expected[30 * MIB : 30 * MIB + 700] = b"tracked" * 100
        cli("backup", "restore", third["id"], "--repo", repo, "--to-volume", "t3")
        out = tmp_path / "t3.raw"
        cli("volume", "export", "t3", "--file", str(out))
        assert out.read_bytes() == bytes(expected)
        assert cli.json("gc", "--dry-run")["debris"] == []  # the kept snapshot is explained
        # the newest backup deleted: gc names its diff base, then removes only that
        fifth = backup(cli, "v", repo)
        assert fifth["change_tracking"] == "rbd-diff"  # tracking started again from fourth
        assert fifth["stats"]["read_bytes"] == 0
        kept = f"backup-{fifth['id']}"
        assert [x["name"] for x in cli.json("snapshot", "list", "v")] == [kept]
        cli("backup", "delete", fifth["id"], "--repo", repo)
        assert cli.json("gc", "--dry-run")["debris"] == [
            f"default/v@{kept}: diff base of a backup this catalogue does not know"
        ]
        assert [x["name"] for x in cli.json("snapshot", "list", "v")] == [kept]  # dry run
        cli("gc")
        assert [x["name"] for x in cli.json("snapshot", "list", "v")] == []
        assert cli.json("gc", "--dry-run")["debris"] == []
        sixth = backup(cli, "v", repo)  # its parent's (fourth's) base went with fifth
        assert sixth["parent"] == fourth["id"] and sixth["change_tracking"] == "hash-compare"
        cli("backup", "restore", sixth["id"], "--repo", repo, "--to-volume", "t6")
        out = tmp_path / "t6.raw"
        cli("volume", "export", "t6", "--file", str(out))
        assert out.read_bytes() == bytes(expected)
        full = backup(cli, "v", repo, "--full")  # a new chain: the old one's base goes
        assert full["parent"] is None and full["stats"]["read_bytes"] == 16 * MIB
        assert [x["name"] for x in cli.json("snapshot", "list", "v")] == [f"backup-{full['id']}"]
        assert cli.json("gc", "--dry-run")["debris"] == []
        cli("volume", "delete", "v")  # with its backup snapshot
    finally:
        from snapback.drivers.storage.rbd import RbdPool

        wipe([RbdPool(n, conffile=rbd_conf) for n in ("vols", "others")])


def test_prune_keeps_what_the_rules_say_and_frees_the_rest(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    src = disk(tmp_path)
    cli("volume", "import", "v", "--file", str(src))
    made = [backup(cli, "v", repo, "--full")["id"] for _ in range(4)]
    refused = cli("repo", "prune", repo, check=False)
    assert refused.returncode == 5 and "--keep" in refused.stderr
    # the four were made seconds apart: one an hour (a day, ...) keeps the newest, and
    # the others unless an hour boundary fell between them
    calendar = ("--keep-hourly", "1", "--keep-daily", "1", "--keep-weekly", "1",
                "--keep-monthly", "1", "--keep-yearly", "1")  # fmt: skip
    dry = cli.json("repo", "prune", repo, *calendar, "--dry-run")
    assert made[-1] in dry["keep"] and sorted([*dry["keep"], *dry["remove"]]) == made
    assert len(dry["keep"]) <= 2 and len(dry["remove"]) >= 2, dry
    assert "daily" in " ".join(map(str, dry["keep"][made[-1]])), dry
    dry = cli.json("repo", "prune", repo, "--keep-last", "2", "--dry-run")
    assert sorted(dry["keep"]) == made[2:] and sorted(dry["remove"]) == made[:2]
    assert [b["id"] for b in cli.json("backup", "list", "--repo", repo)] == made
    done = cli.json("repo", "prune", repo, "--keep-last", "2")
    assert done["gc"]["removed"]
    assert [b["id"] for b in cli.json("backup", "list", "--repo", repo)] == made[2:]
    assert cli.json("repo", "check", repo, "--read-data")["problems"] == []
    assert restore_bytes(cli, made[2], repo, tmp_path, "r") == src.read_bytes()


@pytest.mark.parametrize("step", ["snapping", "recorded", "rotated"])
def test_rbd_backup_killed_keeps_one_diff_base(rbd_conf: str, tmp_path: Path, step: str) -> None:
    from snapback.drivers.storage.rbd import RbdPool
    from tests.rbd_fixtures import wipe

    home = tmp_path / "home"
    home.mkdir()
    (home / "snapback.toml").write_text(
        f'[pools.default]\ndriver = "rbd"\nconf = "{rbd_conf}"\npool = "vols"\n'
        f'[pools.images]\ndriver = "rbd"\nconf = "{rbd_conf}"\npool = "others"\n'
    )
    cli = Cli(home, {})
    repo = str(tmp_path / "repo")
    cli("repo", "init", repo)
    try:
        cli("volume", "import", "v", "--file", str(disk(tmp_path)))
        first = backup(cli, "v", repo)
        res = cli("backup", "create", "v", "--repo", repo, check=False,
                  env={"SNAPBACK_CRASH_AT": f"backup.create:{step}"})  # fmt: skip
        assert res.returncode == -9
        cli("gc")
        records = cli.json("backup", "list", "--repo", repo)
        last = records[-1]
        assert len(records) == (1 if step == "snapping" else 2)
        snaps = [x["name"] for x in cli.json("snapshot", "list", "v")]
        assert snaps == [f"backup-{last['id']}"]  # exactly the newest backup's diff base
        assert cli.json("gc", "--dry-run")["debris"] == []
        nxt = backup(cli, "v", repo)
        assert nxt["change_tracking"] == "rbd-diff" and nxt["parent"] == last["id"]
        assert first["id"] == records[0]["id"]
    finally:
        wipe([RbdPool(n, conffile=rbd_conf) for n in ("vols", "others")])
