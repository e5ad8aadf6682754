"""repo list / rebuild-catalog / export / import on real repository folders, through the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from snapback.catalog.models import BackupEntry
from snapback.config import load_settings
from snapback.services import backup_catalog
from snapback.services.catalog_queries import live_volume
from snapback.services.context import Context
from tests.conftest import Cli, write_bytes
from tests.test_backups import PASS, backup, disk, restore_bytes

MIB = 1 << 20
Member = tuple[tarfile.TarInfo, bytes]


def listing(root: Path) -> dict[str, str]:
    """Every file under a repository folder with the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def catalogue(home: Path) -> Context:
    return Context(load_settings(home))


def two_volumes(
    cli: Cli, tmp_path: Path, repo: str, env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Volumes a (backed up twice, changed in between) and b (once); their records."""
    src_a, src_b = disk(tmp_path, "a.raw"), disk(tmp_path, "b.raw")
    cli("volume", "import", "a", "--file", str(src_a))
    cli("volume", "import", "b", "--file", str(src_b))
    first = backup(cli, "a", repo, env=env)
    change = os.urandom(MIB)
    with open(src_a, "r+b") as f:  # a.raw keeps what volume a now holds
        f.seek(30 * MIB)
        f.write(change)
    ctx = catalogue(cli.home)
    with ctx.sessions() as s:
        storage = live_volume(s, "default", "a").storage_name
    write_bytes(ctx, "default", storage, 30 * MIB, change)
    return [first, backup(cli, "a", repo, env=env), backup(cli, "b", repo, env=env)]


def test_rebuild_catalog_gives_back_exactly_the_entries(cli: Cli, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli("repo", "init", repo)
    made = two_volumes(cli, tmp_path, repo)
    ids = sorted(r["id"] for r in made)
    with catalogue(cli.home).transaction() as s:  # whatever the backups catalogued: gone
        s.execute(delete(BackupEntry))
    assert cli.json("repo", "list") == []
    rebuilt = cli.json("repo", "rebuild-catalog", repo)
    assert rebuilt["added"] == ids and rebuilt["removed"] == [] and rebuilt["backups"] == 3
    entries = backup_catalog.entries(catalogue(cli.home), repo)
    assert [e["id"] for e in entries] == [r["id"] for r in made]
    for entry, rec in zip(entries, made, strict=True):
        assert entry["source"] == {
            "name": rec["source"]["name"],
            "pool": "default",
            "id": rec["source"]["volume_id"],
        }
        assert (entry["mode"], entry["parent"]) == (rec["mode"], rec["parent"])
        assert entry["created_at"] == rec["created_at"]
        assert entry["summary"]["size"] == 48 * MIB
        assert entry["summary"]["stats"]["new_chunks"] == rec["stats"]["new_chunks"]
    repo_id = json.loads((tmp_path / "repo" / "config").read_bytes())["id"]
    listed = cli.json("repo", "list")
    assert listed == [
        {
            "repository": repo,
            "repo_id": repo_id,
            "backups": 3,
            "newest": max(r["created_at"] for r in made),
        }
    ]
    assert "3" in cli("repo", "list").stdout and repo in cli("repo", "list").stdout
    again = cli.json("repo", "rebuild-catalog", repo)
    assert again["added"] == again["removed"] == again["updated"] == [] and again["unchanged"] == 3
    # a fresh state folder: the repository alone gives back the same entries
    fresh = Cli(tmp_path / "fresh-home", {})
    assert fresh.json("repo", "rebuild-catalog", repo)["added"] == ids
    assert backup_catalog.entries(catalogue(fresh.home), repo) == entries
    # a record deleted elsewhere (another host's 'backup delete'): its entry goes
    (tmp_path / "repo" / "backups" / made[0]["id"]).unlink()
    gone = fresh.json("repo", "rebuild-catalog", repo)
    assert gone["removed"] == [made[0]["id"]] and gone["added"] == []
    assert fresh.json("repo", "list")[0]["backups"] == 2
    latest = backup_catalog.latest(catalogue(fresh.home), repo, made[1]["source"]["volume_id"])
    assert latest == made[1]["id"]


def test_catalogue_entries_take_both_record_shapes(ctx: Context, tmp_path: Path) -> None:
    volume = {
        "id": "20261129T010000.000001Z-0000000a",
        "created_at": 100.0,
        "kind": "volume",
        "source": {"name": "v", "pool": "default", "driver": "local", "volume_id": "vol-1"},
        "parent": None,
        "mode": "full",
        "disks": [{"target": "vda", "size": 5, "index": "i"}],
        "stats": {"new_chunks": 1},
    }
    instance = {
        "id": "20261129T010000.000002Z-0000000b",
        "created_at": 200.0,
        "kind": "instance",
        "source": {"instance": "web1", "instance_id": "inst-1"},
        "disks": [{"target": "vda", "size": 7}, {"target": "vdb", "size": 9}],
        "instance": {"name": "web1"},
    }
    url = str(tmp_path / "r")
    assert backup_catalog.record(ctx, url, "rid", volume) == "added"
    assert backup_catalog.record(ctx, url, "rid", volume) == "unchanged"
    assert backup_catalog.record(ctx, url, "rid", instance) == "added"
    rows = {e["id"]: e for e in backup_catalog.entries(ctx, url)}
    assert rows[instance["id"]]["source"] == {"name": "web1", "pool": None, "id": "inst-1"}
    assert rows[instance["id"]]["summary"]["size"] == 16 and rows[instance["id"]]["mode"] is None
    assert backup_catalog.latest(ctx, url, "inst-1") == instance["id"]
    assert backup_catalog.latest(ctx, url, "vol-1") == volume["id"]
    assert backup_catalog.latest(ctx, url, "other") is None
    assert backup_catalog.known_repos(ctx) == [
        {"repository": url, "repo_id": "rid", "backups": 2, "newest": 200.0}
    ]
    assert backup_catalog.forget(ctx, url, volume["id"]) is True
    assert backup_catalog.forget(ctx, url, volume["id"]) is False
    assert backup_catalog.latest(ctx, url, "vol-1") is None


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_export_import_restores_byte_identical(cli: Cli, tmp_path: Path, encrypted: bool) -> None:
    env = PASS if encrypted else {}
    src, dst, alien = (str(tmp_path / n) for n in ("src", "dst", "alien"))
    cli("repo", "init", src, *(["--encrypt"] if encrypted else []), env=env)
    cli("repo", "init", dst, *(["--copy-keys-from", src] if encrypted else []), env=env)
    cli("repo", "init", alien, "--encrypt", env=PASS)
    made = two_volumes(cli, tmp_path, src, env=env)
    incremental = made[1]
    assert incremental["mode"] == "incremental"
    archive = tmp_path / "a.tar"
    out = cli("repo", "export", src, incremental["id"], "--file", str(archive), "--format",
              "json", env=env).json()  # fmt: skip
    assert out["chunks"] == 3 and out["indexes"] == 1 and not (tmp_path / "a.tar.tmp").exists()
    again = cli("repo", "export", src, incremental["id"], "--file", str(archive), check=False,
                env=env)  # fmt: skip
    assert again.returncode == 4 and "never overwrites" in again.stderr

    done = cli("repo", "import", dst, "--file", str(archive), "--format", "json", env=env).json()
    assert done["written"] == {"chunks": 3, "indexes": 1, "backups": 1} and done["present"] == 0
    got = restore_bytes_env(cli, incremental["id"], dst, tmp_path, "back", env)
    assert got == (tmp_path / "a.raw").read_bytes()
    verified = cli("backup", "verify", incremental["id"], "--repo", dst, "--read-data",
                   "--format", "json", env=env).json()  # fmt: skip
    assert verified["ok"]
    before = listing(Path(dst))
    twice = cli("repo", "import", dst, "--file", str(archive), "--format", "json", env=env).json()
    assert twice["written"] == {} and twice["present"] == 5
    assert listing(Path(dst)) == before
    assert [(r["repository"], r["backups"]) for r in cli.json("repo", "list")
            if r["repository"] == dst] == [(dst, 1)]  # fmt: skip

    untouched = listing(Path(alien))
    refused = cli("repo", "import", alien, "--file", str(archive), check=False, env=PASS)
    assert refused.returncode == 6, refused.stderr
    assert "does not share" in refused.stderr and "--copy-keys-from" in refused.stderr
    assert refused.stderr.count("\n") == 1
    assert listing(Path(alien)) == untouched


def restore_bytes_env(
    cli: Cli, backup_id: str, repo: str, tmp: Path, name: str, env: dict[str, str]
) -> bytes:
    cli("backup", "restore", backup_id, "--repo", repo, "--to-volume", name, env=env)
    out = tmp / f"{name}.raw"
    cli("volume", "export", name, "--file", str(out))
    return out.read_bytes()


# -- hostile and damaged archives ----------------------------------------------------------------


def read_members(archive: Path) -> list[Member]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar]  # type: ignore[union-attr]


def write_members(path: Path, members: list[Member], *, fix_manifest: bool = True) -> Path:
    """A tar of ``members``; the manifest recomputed so only the tampering itself is wrong."""
    if fix_manifest:
        sums = {
            m.name: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
            for m, d in members
            if m.name != "manifest.json"
        }
        members = [
            (m, json.dumps({"format": "snapback-export", "members": sums}).encode())
            if m.name == "manifest.json"
            else (m, d)
            for m, d in members
        ]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def file_member(name: str, data: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _flip_chunk(ms: list[Member]) -> list[Member]:
    """One byte flipped in the middle of the first chunk."""
    at = next(n for n, (m, _) in enumerate(ms) if m.name.startswith("chunks/"))
    data = bytearray(ms[at][1])
    data[len(data) // 2] ^= 0x01
    return [*ms[:at], (ms[at][0], bytes(data)), *ms[at + 1 :]]


def _insert(ms: list[Member], member: Member) -> list[Member]:
    return [*ms[:-1], member, ms[-1]]


def _symlink_chunk(ms: list[Member]) -> list[Member]:
    out = []
    for m, d in ms:
        if m.name.startswith("chunks/"):
            link = tarfile.TarInfo(m.name)
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            out.append((link, b""))
        else:
            out.append((m, d))
    return out


def _big_config(ms: list[Member]) -> list[Member]:
    return [(m, d + b" " * (2 * MIB) if m.name == "config" else d) for m, d in ms]


TAMPERINGS: dict[str, tuple[Callable[[list[Member]], list[Member]], bool]] = {
    # name: (edit, recompute the manifest)
    "flipped-chunk-byte": (_flip_chunk, False),
    "flipped-chunk-byte-manifest-forged": (_flip_chunk, True),
    "dotdot-member": (lambda ms: _insert(ms, file_member("../evil", b"evil")), True),
    "absolute-member": (lambda ms: _insert(ms, file_member("/tmp/evil", b"evil")), True),
    "symlink-chunk": (_symlink_chunk, True),
    "oversize-config": (_big_config, True),
    "record-hash-wrong": (lambda ms: ms, False),  # manifest rewritten below with a bad hash
    "no-manifest": (lambda ms: ms[:-1], False),
    "chunk-missing": (lambda ms: [x for x in ms if not x[0].name.startswith("chunks/")], True),
}


def tampered(archive: Path, how: str, tmp_path: Path) -> Path:
    edit, fix = TAMPERINGS[how]
    members = edit(read_members(archive))
    if how == "record-hash-wrong":
        manifest = json.loads(members[-1][1])
        record = next(m.name for m, _ in members if m.name.startswith("backups/"))
        manifest["members"][record]["sha256"] = "0" * 64
        members[-1] = (members[-1][0], json.dumps(manifest).encode())
    return write_members(tmp_path / f"{how}.tar", members, fix_manifest=fix)


@pytest.fixture
def exported(cli: Cli, tmp_path: Path) -> tuple[Path, str, str]:
    """(archive, its backup id, an empty repository sharing the keys)."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    cli("repo", "init", src)
    cli("repo", "init", dst)
    cli("volume", "import", "v", "--file", str(disk(tmp_path)))
    rec = backup(cli, "v", src)
    archive = tmp_path / "good.tar"
    cli("repo", "export", src, rec["id"], "--file", str(archive))
    return archive, rec["id"], dst


@pytest.mark.parametrize("how", sorted(TAMPERINGS))
def test_hostile_or_damaged_archive_is_refused_and_changes_nothing(
    cli: Cli, tmp_path: Path, exported: tuple[Path, str, str], how: str
) -> None:
    archive, backup_id, dst = exported
    bad = tampered(archive, how, tmp_path)
    before = listing(Path(dst))
    res = cli("repo", "import", dst, "--file", str(bad), check=False)
    assert res.returncode == 5, res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "not a usable snapback export" in res.stderr and "nothing was imported" in res.stderr
    assert listing(Path(dst)) == before
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()
    cli("repo", "import", dst, "--file", str(archive))  # the good one still imports
    assert cli.json("backup", "list", "--repo", dst)[0]["id"] == backup_id


def test_hostile_tar_headers_are_refused_unread(
    cli: Cli, tmp_path: Path, exported: tuple[Path, str, str]
) -> None:
    archive, backup_id, dst = exported
    huge = tarfile.TarInfo("snapback-export.json")
    huge.type, huge.size = tarfile.XHDTYPE, 10**12  # a pax header declaring a terabyte
    bad = tmp_path / "huge-pax.tar"
    bad.write_bytes(huge.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    before = listing(Path(dst))
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(os.urandom(4096))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    for path in (bad, not_tar, cut):
        res = cli("repo", "import", dst, "--file", str(path), check=False)
        assert res.returncode == 5 and "not a usable snapback export" in res.stderr, res.stderr
    missing = cli("repo", "import", dst, "--file", str(tmp_path / "nope.tar"), check=False)
    assert missing.returncode == 3
    assert listing(Path(dst)) == before
    cli("repo", "import", dst, "--file", str(archive))
    assert restore_bytes(cli, backup_id, dst, tmp_path, "r") == (tmp_path / "d.raw").read_bytes()


def test_export_of_a_broken_backup_names_what_is_missing(
    cli: Cli, tmp_path: Path, exported: tuple[Path, str, str]
) -> None:
    _, backup_id, _ = exported
    src = tmp_path / "src"
    victim = next(p for p in (src / "chunks").rglob("*") if p.is_file())
    victim.unlink()
    out = tmp_path / "broken.tar"
    res = cli("repo", "export", str(src), backup_id, "--file", str(out), check=False)
    assert res.returncode == 3 and victim.name in res.stderr, res.stderr
    assert not out.exists() and not out.with_name("broken.tar.tmp").exists()
    res = cli("repo", "export", str(src), "../x", "--file", str(out), check=False)
    assert res.returncode == 5
