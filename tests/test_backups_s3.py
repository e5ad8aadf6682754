"""Backups into an s3:// repository on the session's real radosgw, through the CLI.

The cut-off test puts the FaultProxy of tests/backends/test_s3_backend.py
between snapback and the gateway: connections are cut mid-upload, so the
backup fails; the next backup, straight to the gateway, stores only what the
first one did not.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from snapback.repository.backends.s3 import S3Backend
from tests.backends.conftest import remove_bucket
from tests.backends.test_s3_backend import FaultProxy
from tests.ceph_fixture import CephS3
from tests.conftest import Cli, make_raw
from tests.test_backups import PASS, disk

MIB = 1 << 20


@pytest.fixture
def bucket(ceph_s3: CephS3) -> Any:
    """A bucket name nobody uses yet (``repo init`` makes it; removed afterwards);
    yields (name, a backend on it)."""
    name = f"sb-cli-{uuid.uuid4().hex[:16]}"
    backend = S3Backend(
        ceph_s3.endpoint, name, "repo", access_key=ceph_s3.access_key,
        secret_key=ceph_s3.secret_key,
    )  # fmt: skip
    yield name, backend
    if not backend.ensure_bucket():  # it was there: empty it and remove it
        remove_bucket(backend)
    else:
        backend._client.delete_bucket(Bucket=name)


def s3_cli(cli: Cli, s3: CephS3) -> Cli:
    """The CLI with S3 keys in its environment (never in the URL)."""
    env = {"SNAPBACK_S3_ACCESS_KEY": s3.access_key, "SNAPBACK_S3_SECRET_KEY": s3.secret_key}
    return Cli(cli.home, {**cli.env, **env, **PASS})


def url(bucket: str, endpoint: str) -> str:
    return f"s3://{bucket}/repo?endpoint={endpoint}"


def restored(cli: Cli, backup_id: str, repo: str, tmp: Path, name: str) -> bytes:
    cli("backup", "restore", backup_id, "--repo", repo, "--to-volume", name)
    out = tmp / f"{name}.raw"
    cli("volume", "export", name, "--file", str(out))
    return out.read_bytes()


def test_backup_restore_verify_on_s3_through_the_cli(
    cli: Cli, ceph_s3: CephS3, bucket: Any, tmp_path: Path
) -> None:
    name, backend = bucket
    sb, repo = s3_cli(cli, ceph_s3), url(name, ceph_s3.endpoint)
    missing = sb("backup", "list", "--repo", repo, check=False)
    assert missing.returncode == 6 and f"bucket {name!r} does not exist" in missing.stderr
    assert "'snapback repo init' creates it" in missing.stderr
    sb("repo", "init", repo, "--encrypt")  # makes the bucket too
    assert backend.exists("config")
    src = disk(tmp_path)
    first_bytes = src.read_bytes()
    sb("volume", "import", "v", "--file", str(src))
    full = sb.json("backup", "create", "v", "--repo", repo)
    assert full["mode"] == "full" and full["stats"]["new_chunks"] == 2
    from snapback.config import load_settings
    from snapback.services.catalog_queries import live_volume
    from snapback.services.context import Context
    from tests.conftest import write_bytes

    ctx = Context(load_settings(cli.home))
    with ctx.sessions() as s:
        storage = live_volume(s, "default", "v").storage_name
    change = os.urandom(MIB)
    write_bytes(ctx, "default", storage, 40 * MIB, change)
    incremental = sb.json("backup", "create", "v", "--repo", repo)
    assert incremental["mode"] == "incremental" and incremental["parent"] == full["id"]
    assert incremental["stats"]["new_chunks"] == 1
    expected = bytearray(first_bytes)
    expected[40 * MIB : 41 * MIB] = change
    assert restored(sb, full["id"], repo, tmp_path, "r-full") == first_bytes
    assert restored(sb, incremental["id"], repo, tmp_path, "r-incr") == bytes(expected)
    for b in (full, incremental):
        assert sb.json("backup", "verify", b["id"], "--repo", repo, "--read-data")["ok"]
    listed = [b["id"] for b in sb.json("backup", "list", "--repo", repo)]
    assert listed == [full["id"], incremental["id"]]
    check = sb.json("repo", "check", repo, "--read-data")
    assert check["problems"] == [] and check["unreferenced"] == 0
    # the same backup carried off the bucket in an archive, into a folder sharing the keys
    archive, offsite = tmp_path / "b.tar", str(tmp_path / "offsite")
    sb("repo", "export", repo, incremental["id"], "--file", str(archive))
    sb("repo", "init", offsite, "--copy-keys-from", repo)
    sb("repo", "import", offsite, "--file", str(archive))
    assert restored(sb, incremental["id"], offsite, tmp_path, "r-off") == bytes(expected)


def test_backup_cut_off_mid_upload_resumes(
    cli: Cli, ceph_s3: CephS3, bucket: Any, tmp_path: Path
) -> None:
    name, backend = bucket
    sb = s3_cli(cli, ceph_s3)
    direct = url(name, ceph_s3.endpoint)
    sb("repo", "init", direct, "--encrypt")
    chunks = 10
    data = {n * 4 * MIB: os.urandom(4 * MIB) for n in range(chunks)}  # incompressible
    src = make_raw(tmp_path / "big.raw", 48 * MIB, data)
    sb("volume", "import", "big", "--file", str(src))
    proxy = FaultProxy(ceph_s3)
    try:
        # the first two connections carry about two chunks each, every later one is cut
        # after 1 MiB: each chunk upload then fails on every retry, small requests pass
        proxy.plans = [("cut", 9 * MIB)] * 2 + [("cut", 1 * MIB)] * 500
        cut = sb("backup", "create", "big", "--repo", url(name, proxy.endpoint), check=False)
    finally:
        proxy.close()
    assert cut.returncode == 6, cut.stderr
    assert cut.stderr.startswith("error: ") and cut.stderr.count("\n") == 1, cut.stderr
    stored = {i.key for i in backend.list_objects("chunks/")}
    assert 0 < len(stored) < chunks, stored
    assert not list(backend.list_objects("backups/"))  # no record: the backup does not exist
    assert not list(backend.list_objects("locks/"))  # the failed backup removed its lock
    assert sb.json("snapshot", "list", "big") == []  # and its temporary snapshot

    done = sb.json("backup", "create", "big", "--repo", direct)
    assert done["mode"] == "full"
    assert done["stats"]["new_chunks"] == chunks - len(stored)  # only what was missing
    assert done["stats"]["reused_chunks"] == len(stored)
    assert restored(sb, done["id"], direct, tmp_path, "back") == src.read_bytes()
    check = sb.json("repo", "check", direct, "--read-data")
    assert check["problems"] == [] and check["unreferenced"] == 0 and check["chunks"] == chunks
    gc = sb.json("repo", "gc", direct)
    assert gc["removed"] and gc["unreferenced_chunks"] == 0
