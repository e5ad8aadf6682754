"""``snapback repo list | rebuild-catalog | export | import``: repository administration.

Attached to the ``repo`` group of ``snapback.cli.backups`` by ``cli/main.py``.
The repository code (zstd, ciphers) and the catalogue are loaded only when a
command runs.
"""

from __future__ import annotations

import time
from typing import Any

import click

from snapback.cli.backups import EXIT_DAMAGED, PASSPHRASE_OPTION, open_repo, passphrase
from snapback.cli.main import context
from snapback.cli.output import FORMAT_OPTION, emit, human_size, table

ORDER = ("chunks", "indexes", "backups")


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


@click.command("list")
@FORMAT_OPTION
def repo_list(fmt: str) -> None:
    """Repositories the catalogue knows: backups made, imported or rebuilt here."""
    from snapback.services import backup_catalog

    rows = backup_catalog.known_repos(context(click.get_current_context()))
    emit(
        fmt,
        rows,
        lambda rs: table(
            [
                {
                    "repository": r["repository"],
                    "id": r["repo_id"],
                    "backups": r["backups"],
                    "newest": _when(r["newest"]),
                }
                for r in rs
            ],
            ["repository", "id", "backups", "newest"],
        ),
    )


def _rebuild_text(out: dict[str, Any]) -> str:
    lines = [
        f"{out['repository']}: {out['backups']} backups; added {len(out['added'])}, "
        f"updated {len(out['updated'])}, removed {len(out['removed'])}, "
        f"unchanged {out['unchanged']}"
    ]
    lines += [f"  added     {b}" for b in out["added"]]
    lines += [f"  updated   {b}" for b in out["updated"]]
    lines += [f"  removed   {b}" for b in out["removed"]]
    lines += [f"  unreadable {b} (kept; see 'repo check')" for b in out["unreadable"]]
    return "\n".join(lines)


@click.command("rebuild-catalog")
@click.argument("repo_url", metavar="REPO")
@PASSPHRASE_OPTION
@FORMAT_OPTION
def repo_rebuild_catalog(repo_url: str, passphrase_file: str | None, fmt: str) -> None:
    """Make the catalogue's backups of REPO exactly the records REPO holds (exit 8 when
    some record is unreadable)."""
    from snapback.services import backup_catalog

    ctx = context(click.get_current_context())
    r = open_repo(repo_url, passphrase(passphrase_file))
    out = backup_catalog.rebuild(ctx, r, repo_url)
    emit(fmt, out, _rebuild_text)
    if out["unreadable"]:
        raise SystemExit(EXIT_DAMAGED)


@click.command("export")
@click.argument("repo_url", metavar="REPO")
@click.argument("backup_id", metavar="BACKUP")
@click.option(
    "--file",
    "path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The archive to write (never overwritten; written as FILE.tmp, then renamed).",
)
@PASSPHRASE_OPTION
@FORMAT_OPTION
def repo_export(
    repo_url: str, backup_id: str, path: str, passphrase_file: str | None, fmt: str
) -> None:
    """Write BACKUP with everything it needs into one self-contained archive file."""
    from snapback.repository.archive import export_backup

    r = open_repo(repo_url, passphrase(passphrase_file))
    report = export_backup(r, backup_id, path)
    emit(
        fmt,
        report,
        lambda e: (
            f"exported {e.backup} to {e.file}: {e.indexes} indexes, {e.chunks} chunks, "
            f"{human_size(e.bytes)}"
        ),
    )


@click.command("import")
@click.argument("repo_url", metavar="REPO")
@click.option(
    "--file", "path", required=True, type=click.Path(dir_okay=False), help="An export archive."
)
@PASSPHRASE_OPTION
@FORMAT_OPTION
def repo_import(repo_url: str, path: str, passphrase_file: str | None, fmt: str) -> None:
    """Check an export archive entirely, then add its backup to REPO (objects REPO already
    holds are skipped; the record is written last). REPO must share the archive's keys."""
    from snapback.repository.archive_import import import_backup
    from snapback.services import backup_catalog

    ctx = context(click.get_current_context())
    r = open_repo(repo_url, passphrase(passphrase_file))
    report = import_backup(r, path)
    backup_catalog.record(ctx, repo_url, r.config.id, report.record)
    out = {
        "backup": report.backup,
        "source_repository": report.source_repository,
        "written": report.written,
        "written_bytes": report.written_bytes,
        "present": report.present,
    }
    emit(
        fmt,
        out,
        lambda o: (
            f"imported {o['backup']} into {repo_url}: wrote "
            + (", ".join(f"{o['written'][k]} {k}" for k in ORDER if k in o["written"]) or "nothing")
            + f" ({human_size(o['written_bytes'])}); {o['present']} already there"
        ),
    )


COMMANDS = (repo_list, repo_rebuild_catalog, repo_export, repo_import)
