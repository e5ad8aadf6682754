"""``snapback backup ...``, the ``repo`` group with ``repo init``, and the options
and helpers every repository command shares (the other ``repo`` commands:
repo_maintenance.py, repo_admin.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from snapback.cli.main import context
from snapback.cli.output import FORMAT_OPTION, emit, fields, human_size, table
from snapback.cli.volumes import POOL_OPTION, progress_bar
from snapback.domain.errors import InvalidInput

if TYPE_CHECKING:  # loaded on use: zstd and the ciphers cost every other command's start-up
    from snapback.repository.repo import Repository
    from snapback.services.backups import BackupService

EXIT_DAMAGED = 8

REPO_OPTION = click.option(
    "--repo",
    "repo_url",
    required=True,
    envvar="SNAPBACK_REPO",
    help="Repository: a folder, or s3://BUCKET[/PREFIX]?endpoint=URL (env SNAPBACK_REPO).",
)
PASSPHRASE_OPTION = click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, exists=True),
    help="File holding the repository passphrase (default: env SNAPBACK_REPO_PASSPHRASE).",
)


def passphrase(path: str | None) -> str | None:
    if path:
        return Path(path).read_text().rstrip("\n")
    return os.environ.get("SNAPBACK_REPO_PASSPHRASE")


def service() -> BackupService:
    from snapback.services.backups import BackupService

    return BackupService(context(click.get_current_context()))


def open_repo(url: str, secret: str | None) -> Repository:
    from snapback.repository.repo import Repository, open_backend

    return Repository.open(open_backend(url), secret)


def delete_backups(r: Repository, repo_url: str, backup_ids: list[str]) -> None:
    """Delete each backup's record from the repository, then its catalogue entry."""
    from snapback.services import backup_catalog

    ctx = context(click.get_current_context())
    for backup_id in backup_ids:
        r.delete_record(backup_id)
        backup_catalog.forget(ctx, repo_url, backup_id)


def source_label(r: dict[str, Any]) -> str:
    src = r["source"]
    if r.get("kind") == "instance":
        return f"instance {src['name']}"
    return f"{src['pool']}/{src['name']}"


def backup_text(r: dict[str, Any]) -> str:
    out = {
        "id": r["id"],
        "kind": r["kind"],
        "source": source_label(r),
        "mode": r["mode"],
        "parent": r["parent"],
        "change tracking": r["change_tracking"],
        "consistency": r.get("consistency"),
        "disks": ", ".join(
            f"{d.get('target', 'vda')}={d['volume']} ({human_size(d['size'])})" for d in r["disks"]
        ),
        "read": human_size(r["stats"]["read_bytes"]),
        "new": f"{r['stats']['new_chunks']} chunks, {human_size(r['stats']['new_bytes'])}",
        "seconds": r["stats"].get("seconds"),
    }
    if r.get("note"):
        out["note"] = r["note"]
    return fields(out)


@click.group()
def repo() -> None:
    """Backup repositories (docs/repository-format.md)."""


@repo.command("init")
@click.argument("repo_url", metavar="REPO")
@click.option("--encrypt", is_flag=True, help="Encrypt with a passphrase (AES-256-GCM, Argon2id).")
@click.option(
    "--copy-keys-from",
    "keys_from",
    metavar="REPO",
    help="Share another repository's keys (needed to 'repo sync' into this one when "
    "that one is encrypted); the passphrase opens both.",
)
@PASSPHRASE_OPTION
@FORMAT_OPTION
def init(
    repo_url: str, encrypt: bool, keys_from: str | None, passphrase_file: str | None, fmt: str
) -> None:
    """Create an empty repository."""
    secret = passphrase(passphrase_file) if encrypt or keys_from else None
    source = open_repo(keys_from, secret) if keys_from else None
    if source is not None and not source.config.encrypted:
        secret = None
    if encrypt and not secret:
        raise InvalidInput("--encrypt needs a passphrase (SNAPBACK_REPO_PASSPHRASE or a file)")
    from snapback.repository.repo import Repository, open_backend

    r = Repository.init(open_backend(repo_url), secret, keys_from=source)
    out = {"repository": repo_url, "id": r.config.id, "encrypted": r.config.encrypted}
    emit(fmt, out, lambda o: f"initialised {repo_url} (encrypted: {o['encrypted']})")


@click.group()
def backup() -> None:
    """Backups of volumes into a repository."""


@backup.command("create")
@click.argument("volume", required=False)
@click.option(
    "--instance", metavar="INSTANCE", help="Back up every disk of INSTANCE at one point in time."
)
@REPO_OPTION
@POOL_OPTION
@click.option("--full", "mode", flag_value="full", help="Store every chunk again (no parent).")
@click.option("--incremental", "mode", flag_value="incremental", help="Fail if there is no parent.")
@click.option(
    "--quiesce",
    type=click.Choice(["auto", "required", "off"]),
    default="auto",
    show_default=True,
    help="With --instance, when it runs: freeze its file systems through the guest agent.",
)
@PASSPHRASE_OPTION
@FORMAT_OPTION
def create(
    volume: str | None,
    instance: str | None,
    repo_url: str,
    pool: str | None,
    mode: str | None,
    quiesce: str,
    passphrase_file: str | None,
    fmt: str,
) -> None:
    """Back up VOLUME (or --instance INSTANCE): its point in time, the chunks that
    changed since the last backup (all allocated ones for the first), the index,
    and last the record."""
    if (volume is None) == (instance is None):
        raise InvalidInput("give either VOLUME or --instance INSTANCE")
    svc, secret = service(), passphrase(passphrase_file)
    with progress_bar("backup", fmt) as bar:
        if instance is not None:
            record = svc.create_instance(
                instance, repo_url, mode=mode or "auto", quiesce=quiesce, passphrase=secret,
                progress=bar,
            )  # fmt: skip
        else:
            assert volume is not None
            record = svc.create(
                volume, repo_url, pool=pool, mode=mode or "auto", passphrase=secret, progress=bar
            )
    emit(fmt, record, backup_text)


@backup.command("list")
@REPO_OPTION
@PASSPHRASE_OPTION
@FORMAT_OPTION
def list_(repo_url: str, passphrase_file: str | None, fmt: str) -> None:
    """List the backups of a repository, oldest first."""
    records = service().list_backups(repo_url, passphrase(passphrase_file))
    emit(
        fmt,
        records,
        lambda rs: table(
            [
                {
                    "id": r["id"],
                    "source": source_label(r),
                    "mode": r["mode"],
                    "size": human_size(sum(d["size"] for d in r["disks"])),
                    "new": human_size(r["stats"]["new_bytes"]),
                }
                for r in rs
            ],
            ["id", "source", "mode", "size", "new"],
        ),
    )


@backup.command("show")
@click.argument("backup_id", metavar="BACKUP")
@REPO_OPTION
@PASSPHRASE_OPTION
@FORMAT_OPTION
def show(backup_id: str, repo_url: str, passphrase_file: str | None, fmt: str) -> None:
    """Show a backup record."""
    emit(fmt, service().show(backup_id, repo_url, passphrase(passphrase_file)), backup_text)


@backup.command("restore")
@click.argument("backup_id", metavar="[BACKUP]", required=False)
@REPO_OPTION
@click.option("--to-volume", help="Name of the new volume.")
@click.option(
    "--to-instance",
    help="Name of a new instance: every disk of an instance backup plus its definition.",
)
@click.option("--disk", metavar="TARGET", help="With --to-volume: which disk (vda, vdb, ...).")
@click.option("--start", is_flag=True, help="With --to-instance: start it once restored.")
@click.option(
    "--at",
    "at",
    metavar="TIME",
    help="Instead of BACKUP: the last backup of --of taken at or before TIME "
    "(ISO 8601, e.g. 2026-11-29T01:00:00Z; no zone means UTC).",
)
@click.option("--of", "source", metavar="VOLUME", help="With --at: the backed-up volume's name.")
@POOL_OPTION
@PASSPHRASE_OPTION
@FORMAT_OPTION
def restore(
    backup_id: str | None,
    repo_url: str,
    to_volume: str | None,
    to_instance: str | None,
    disk: str | None,
    start: bool,
    at: str | None,
    source: str | None,
    pool: str | None,
    passphrase_file: str | None,
    fmt: str,
) -> None:
    """Restore a backup into a new volume, or an instance backup into a new instance
    (zero chunks stay holes)."""
    svc, secret = service(), passphrase(passphrase_file)
    if (to_volume is None) == (to_instance is None):
        raise InvalidInput("give either --to-volume NAME or --to-instance NAME")
    backup_id = chosen_backup(svc, repo_url, backup_id, at, source, secret)
    with progress_bar("restore", fmt) as bar:
        if to_instance is not None:
            out = svc.restore_instance(
                backup_id, repo_url, to_instance, pool=pool, start=start, passphrase=secret,
                progress=bar,
            )  # fmt: skip
            emit(fmt, out, restored_instance_text)
            return
        assert to_volume is not None
        out = svc.restore(
            backup_id, repo_url, to_volume, pool=pool, disk=disk, passphrase=secret, progress=bar
        )
    emit(fmt, out, lambda o: f"restored {o['backup']} ({o['disk']}) into {o['volume']}")


def restored_instance_text(o: dict[str, Any]) -> str:
    disks = ", ".join(f"{d['target']}={d['volume']}" for d in o["disks"])
    text = f"restored {o['backup']} into instance {o['instance']} ({o['status']}): {disks}"
    return text + (f"\nnote: {o['note']}" if o.get("note") else "")


def chosen_backup(
    svc: BackupService,
    repo_url: str,
    backup_id: str | None,
    at: str | None,
    source: str | None,
    secret: str | None,
) -> str:
    """BACKUP, or with --at TIME the last backup of --of VOLUME taken at or before it."""
    if (backup_id is None) == (at is None):
        raise InvalidInput("give either BACKUP or --at TIME (with --of VOLUME)")
    if at is None:
        assert backup_id is not None
        return backup_id
    if not source:
        raise InvalidInput("--at needs --of VOLUME: which volume's backups to pick from")
    return svc.pick(repo_url, source, parse_time(at), secret)


def parse_time(text: str) -> float:
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(f"cannot read time {text!r} (use ISO 8601)") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@backup.command("verify")
@click.argument("backup_id", metavar="BACKUP")
@REPO_OPTION
@click.option("--read-data", is_flag=True, help="Read, authenticate and hash every chunk.")
@PASSPHRASE_OPTION
@FORMAT_OPTION
def verify(
    backup_id: str, repo_url: str, read_data: bool, passphrase_file: str | None, fmt: str
) -> None:
    """Check that a backup can be restored; exit 8 naming what is missing or damaged."""
    report = service().verify(
        backup_id, repo_url, read_data=read_data, passphrase=passphrase(passphrase_file)
    )
    emit(
        fmt,
        {**report.__dict__, "ok": report.ok},
        lambda r: (
            f"{backup_id}: {'ok' if r['ok'] else 'BROKEN'}; {r['chunks']} chunks"
            + "".join(f"\n  missing {m}" for m in r["missing"])
            + "".join(f"\n  damaged {d}" for d in r["damaged"])
        ),
    )
    if not report.ok:
        raise SystemExit(EXIT_DAMAGED)


@backup.command("delete")
@click.argument("backup_id", metavar="BACKUP")
@REPO_OPTION
@PASSPHRASE_OPTION
@FORMAT_OPTION
def delete(backup_id: str, repo_url: str, passphrase_file: str | None, fmt: str) -> None:
    """Delete a backup record; 'repo gc' then frees what nothing else references."""
    repo = service().open_repo(repo_url, passphrase(passphrase_file))
    delete_backups(repo, repo_url, [backup_id])
    emit(fmt, {"backup": backup_id, "result": "deleted"}, lambda r: f"{backup_id}: deleted")
