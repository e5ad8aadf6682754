"""Change tracking of local volumes with persistent qcow2 dirty bitmaps, for real:
qemu-img adds the bitmaps, QEMU (qemu-nbd) marks them, libnbd reads them back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from snapback.catalog.models import Volume
from snapback.config import load_settings
from snapback.drivers.imagefmt import qemu_img
from snapback.services.catalog_queries import live_volume
from snapback.services.context import Context
from tests.conftest import Cli, assert_consistent, make_raw, write_bytes

MIB = 1 << 20


@pytest.fixture
def repo(cli: Cli, tmp_path: Path) -> str:
    path = str(tmp_path / "repo")
    cli("repo", "init", path)
    return path


def backup(cli: Cli, volume: str, repo: str, *extra: str) -> dict[str, Any]:
    argv = ("backup", "create", volume, "--repo", repo, "--format", "json", *extra)
    return json.loads(cli(*argv).stdout)


def volume(ctx: Context, name: str) -> Volume:
    with ctx.sessions() as s:
        return live_volume(s, "default", name)


def head(ctx: Context, name: str) -> Path:
    return Path(ctx.pool("default").attachment(volume(ctx, name).storage_name).source)


def write(ctx: Context, name: str, offset: int, data: bytes) -> None:
    write_bytes(ctx, "default", volume(ctx, name).storage_name, offset, data)


def same_bytes(cli: Cli, repo: str, backup_id: str, name: str, tmp: Path) -> bool:
    cli("backup", "restore", backup_id, "--repo", repo, "--to-volume", f"r-{backup_id[-8:]}")
    got, want = tmp / "got.raw", tmp / "want.raw"
    for path in (got, want):
        path.unlink(missing_ok=True)
    cli("volume", "export", f"r-{backup_id[-8:]}", "--file", str(got))
    cli("volume", "export", name, "--file", str(want))
    return got.read_bytes() == want.read_bytes()


def tracked(ctx: Context, name: str) -> set[str]:
    """The names of the dirty bitmaps on volume ``name``'s head, as QEMU lists them."""
    return set(qemu_img.bitmaps(str(head(ctx, name))))


def test_incrementals_read_only_what_the_bitmap_marks(cli: Cli, repo: str, tmp_path: Path) -> None:
    src = make_raw(tmp_path / "d.raw", 48 * MIB, {0: os.urandom(MIB), 20 * MIB: os.urandom(MIB)})
    cli("volume", "import", "v", "--file", str(src))
    ctx = Context(load_settings(cli.home))
    full = backup(cli, "v", repo)
    assert full["change_tracking"] == "none" and full["stats"]["read_bytes"] == 8 * MIB
    bitmaps = qemu_img.bitmaps(str(head(ctx, "v")))
    name = f"snapback-{full['id']}"
    assert list(bitmaps) == [name] and "auto" in bitmaps[name]

    write(ctx, "v", 5 * MIB, os.urandom(64 << 10))  # chunk 1
    write(ctx, "v", 30 * MIB, os.urandom(MIB))  # chunk 7
    second = backup(cli, "v", repo)
    assert second["change_tracking"] == "dirty-bitmap" and second["parent"] == full["id"]
    assert second["stats"]["read_bytes"] == 8 * MIB  # the two marked chunks, nothing else
    # the parent's bitmap stays until the next backup: no qemu-img after the record
    assert tracked(ctx, "v") == {f"snapback-{full['id']}", f"snapback-{second['id']}"}
    assert same_bytes(cli, repo, second["id"], "v", tmp_path)

    # a snapshot moves the head: the bitmap goes on with it; deleting the snapshot
    # merges the layers and the merged file still knows what changed
    cli("snapshot", "create", "v@s1")
    write(ctx, "v", 40 * MIB, os.urandom(4096))  # chunk 10
    cli("snapshot", "delete", "v@s1")
    third = backup(cli, "v", repo)
    assert third["change_tracking"] == "dirty-bitmap"
    assert third["stats"]["read_bytes"] == 4 * MIB
    assert same_bytes(cli, repo, third["id"], "v", tmp_path)
    # the full backup's bitmap went while the third read: the chain needs it no more
    assert tracked(ctx, "v") == {f"snapback-{second['id']}", f"snapback-{third['id']}"}

    unchanged = backup(cli, "v", repo)
    assert unchanged["change_tracking"] == "dirty-bitmap"
    assert unchanged["stats"]["read_bytes"] == 0 and unchanged["stats"]["new_chunks"] == 0

    # the newest backup deleted, the next one follows the one before it, by its bitmap
    cli("backup", "delete", unchanged["id"], "--repo", repo)
    write(ctx, "v", 9 * MIB, os.urandom(4096))  # chunk 2
    after = backup(cli, "v", repo)
    assert after["parent"] == third["id"] and after["change_tracking"] == "dirty-bitmap"
    assert after["stats"]["read_bytes"] == 4 * MIB
    assert same_bytes(cli, repo, after["id"], "v", tmp_path)
    cli("gc")  # the deleted backup's bitmap goes; the chain's stay
    assert tracked(ctx, "v") == {f"snapback-{third['id']}", f"snapback-{after['id']}"}
    assert_consistent(ctx)


def test_a_full_backup_drops_the_bitmaps_of_the_chain_it_replaces(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    """After ``--full`` no backup follows the old chain's bitmaps: they would be marked
    by QEMU for nothing, so the full backup removes them as it reads."""
    src = make_raw(tmp_path / "d.raw", 32 * MIB, {0: os.urandom(MIB)})
    cli("volume", "import", "v", "--file", str(src))
    ctx = Context(load_settings(cli.home))
    first = backup(cli, "v", repo)
    write(ctx, "v", 8 * MIB, os.urandom(MIB))
    second = backup(cli, "v", repo)
    assert tracked(ctx, "v") == {f"snapback-{first['id']}", f"snapback-{second['id']}"}
    full = backup(cli, "v", repo, "--full")
    assert full["mode"] == "full" and full["parent"] is None
    assert tracked(ctx, "v") == {f"snapback-{full['id']}"}
    write(ctx, "v", 20 * MIB, os.urandom(4096))
    nxt = backup(cli, "v", repo)
    assert nxt["parent"] == full["id"] and nxt["change_tracking"] == "dirty-bitmap"
    assert nxt["stats"]["read_bytes"] == 4 * MIB
    assert same_bytes(cli, repo, nxt["id"], "v", tmp_path)
    assert_consistent(ctx)


def test_rollback_loses_tracking_and_the_next_backup_says_so(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    src = make_raw(tmp_path / "d.raw", 32 * MIB, {0: os.urandom(2 * MIB)})
    cli("volume", "import", "v", "--file", str(src))
    ctx = Context(load_settings(cli.home))
    cli("snapshot", "create", "v@before")
    backup(cli, "v", repo)
    write(ctx, "v", 12 * MIB, os.urandom(MIB))
    cli("snapshot", "rollback", "v@before")  # the written range is gone again
    fallback = backup(cli, "v", repo)
    assert fallback["change_tracking"] == "hash-compare"
    assert "tracking lost" in fallback["note"] and "dirty bitmap" in fallback["note"]
    assert same_bytes(cli, repo, fallback["id"], "v", tmp_path)
    again = backup(cli, "v", repo)  # tracking started again from the fallback
    assert again["change_tracking"] == "dirty-bitmap" and again["stats"]["read_bytes"] == 0


def test_bitmap_left_in_use_by_a_killed_writer_is_not_trusted(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    """qemu-nbd writing the volume is killed -9, as a crashed VM would be: the bitmap
    stays flagged in-use (it may miss writes), so the next backup compares hashes."""
    src = make_raw(tmp_path / "d.raw", 32 * MIB, {0: os.urandom(MIB)})
    cli("volume", "import", "v", "--file", str(src))
    ctx = Context(load_settings(cli.home))
    first = backup(cli, "v", repo)
    path = head(ctx, "v")
    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), str(path)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        import nbd

        h = nbd.NBD()
        h.connect_unix(str(sock))
        h.pwrite(os.urandom(MIB), 16 * MIB)
        h.flush()
        os.kill(server.pid, signal.SIGKILL)
    finally:
        server.wait()
    assert "in-use" in qemu_img.bitmaps(str(path))[f"snapback-{first['id']}"]
    nxt = backup(cli, "v", repo)
    assert nxt["change_tracking"] == "hash-compare" and "not stored cleanly" in nxt["note"]
    assert same_bytes(cli, repo, nxt["id"], "v", tmp_path)
    assert list(qemu_img.bitmaps(str(head(ctx, "v")))) == [f"snapback-{nxt['id']}"]


def test_gc_removes_the_tracking_of_backups_the_catalogue_forgot(
    cli: Cli, repo: str, tmp_path: Path
) -> None:
    """A deleted backup's bitmap would be marked by QEMU for ever: gc removes it, and
    only it; the next backup follows the one before, whose bitmap the chain kept."""
    src = make_raw(tmp_path / "d.raw", 32 * MIB, {0: os.urandom(2 * MIB)})
    cli("volume", "import", "v", "--file", str(src))
    ctx = Context(load_settings(cli.home))
    first = backup(cli, "v", repo)
    write(ctx, "v", 8 * MIB, os.urandom(MIB))
    second = backup(cli, "v", repo)
    both = {f"snapback-{first['id']}", f"snapback-{second['id']}"}
    assert tracked(ctx, "v") == both
    assert cli.json("gc")["debris"] == []  # a known backup's bitmap stays
    cli("backup", "delete", second["id"], "--repo", repo)
    shown = cli.json("gc", "--dry-run")["debris"]
    assert shown == [
        f"default/v bitmap snapback-{second['id']}: change tracking of a backup this "
        "catalogue does not know"
    ]
    assert tracked(ctx, "v") == both
    assert cli.json("gc")["debris"] == [f"removed {shown[0]}"]
    assert tracked(ctx, "v") == {f"snapback-{first['id']}"}
    write(ctx, "v", 20 * MIB, os.urandom(4096))
    third = backup(cli, "v", repo)  # its parent is the first again, still tracked
    assert third["parent"] == first["id"] and third["change_tracking"] == "dirty-bitmap"
    assert third["stats"]["read_bytes"] == 8 * MIB  # written since the first: chunks 2, 5
    assert same_bytes(cli, repo, third["id"], "v", tmp_path)
    assert tracked(ctx, "v") == {f"snapback-{first['id']}", f"snapback-{third['id']}"}
    assert_consistent(ctx)
